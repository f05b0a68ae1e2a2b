"""A local Kubernetes cluster for development, demos and the cluster tests.

A real control plane on loopback (etcd, kube-apiserver, kube-controller-manager, kube-scheduler),
KWOK for fake nodes where nothing runs, and the process kubelet for nodes whose pods run their
real container commands as local processes::

    python -m imagefleet.devcluster up [--nodes N --gpus G --kwok-nodes K]   # prints export lines
    python -m imagefleet.devcluster env
    python -m imagefleet.devcluster down

Modules:

* :mod:`.controlplane` -- :class:`~.controlplane.ControlPlane`: start, credentials, stop; the CLI;
* :mod:`.kubelet` -- :class:`~.kubelet.ProcessKubelet`, the process kubelet (also
  ``python -m imagefleet.devcluster.kubelet``), with :mod:`.podworker` (one pod's lifecycle),
  :mod:`.sandbox` (its directories, volumes, service-account files),
  :mod:`.podspec` (env, ``$(VAR)``, translations), :mod:`.podstatus` (status, back-off),
  :mod:`.probes`, :mod:`.volumes`, :mod:`.ipam`, :mod:`.runtime` (processes) and
  :mod:`.kubeapi` (JSON API client, list-then-watch);
* :mod:`.binaries`, :mod:`.pki`, :mod:`.processes`, :mod:`.components`, :mod:`.nodes` -- the
  control plane's parts: where the binaries are, certificates, process lifecycle, command lines,
  node manifests.

It needs the ``kubernetes`` client and, for the control plane's certificates, ``cryptography``
(installed with the ``dev`` extra); it never imports the components
(``imagefleet.inference_pod``, ``.router``, ``.operator``) or on ``imagefleet.testing``. Nothing
is imported here, so ``python -m imagefleet.devcluster.kubelet`` loads only what it needs.
"""
