{{/*
The operator's rules on namespaced resources: in its ClusterRole when it watches every namespace,
in a Role of each watched namespace otherwise.
*/}}
{{- define "imagefleet.namespacedRules" -}}
# The resources it serves: watched, their status and scale subresources written.
- apiGroups: ["imagefleet.dev"]
  resources: ["imagegenerators"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["imagefleet.dev"]
  resources: ["imagegenerators/status", "imagegenerators/scale"]
  verbs: ["get", "patch", "update"]
# ownerReferences with blockOwnerDeletion need this where the OwnerReferencesPermissionEnforcement
# admission plugin runs (e.g. OpenShift); it allows setting finalizers on ImageGenerators, nothing more.
- apiGroups: ["imagefleet.dev"]
  resources: ["imagegenerators/finalizers"]
  verbs: ["update"]
# Inference pods: created and updated with server-side apply, deleted to replace faulty ones.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Services (headless pods Service, router Service), the settings ConfigMap, the router's
# ServiceAccount; server-side apply, removed by garbage collection through ownerReferences.
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The NetworkPolicy that lets only a resource's routers, the operator and metrics scrapers reach
# its inference pods (--network-policy).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# The router's Role (pods get/list/watch: allowed because the operator holds them itself) and
# its RoleBinding.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Events: the operator's own (events.k8s.io) and kopf's (core).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
