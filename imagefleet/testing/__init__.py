"""Test support: real servers on loopback, for tests and benchmarks.

* :mod:`.servers` and :mod:`.routers` -- run pods and routers on loopback;
* :mod:`.wait` -- polling with a message that says what was last seen.

The local Kubernetes cluster the cluster tests run against (control plane, KWOK nodes and the
process kubelet) is not test code: it lives in :mod:`imagefleet.devcluster`
(``python -m imagefleet.devcluster up|down|env``), which imports nothing from here.

Nothing is imported here, so that importing one helper never pulls in the others' dependencies.
"""
