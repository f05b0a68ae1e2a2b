"""Test support: real servers and a real Kubernetes control plane, for tests and benchmarks.

Servers: :mod:`.servers` and :mod:`.routers` run pods and routers on loopback.

Control plane (``tools/k8s`` builds the binaries; ``tests/cluster/conftest.py`` uses it):

* :mod:`.controlplane` -- etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK
  on loopback with fake GPU nodes; ``python -m imagefleet.testing.controlplane up|down|env``;
* :mod:`.binaries`, :mod:`.pki`, :mod:`.processes`, :mod:`.components`, :mod:`.nodes` -- its
  parts: where the binaries are, certificates, process lifecycle, command lines, fake nodes;
* :mod:`.wait` -- polling with a message that says what was last seen.

Nothing is imported here, so that ``python -m imagefleet.testing.controlplane`` loads that module
only once and importing one helper never pulls in the others' dependencies.
"""
