# Kubernetes test binaries and the local control plane; included by the main Makefile.
# See docs/local-cluster.md.

K8S_BUILD := tools/k8s/build.sh
K8S_CONTROLPLANE := -m imagefleet.devcluster

# Under make the cluster tests fail instead of skipping when the binaries are missing:
# `make test` builds them first, so a skip there could only hide a broken build.
export IMAGEFLEET_REQUIRE_CLUSTER ?= 1

.PHONY: k8s-tools cluster-up cluster-down cluster-env demo chart-lint

k8s-tools: ## build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, kubectl, helm (cached by version)
	@bash $(K8S_BUILD)

cluster-up: install k8s-tools ## start a local control plane with fake GPU nodes; prints the export lines to use it
	@$(PY) $(K8S_CONTROLPLANE) up

cluster-env: ## print the export lines of the running local control plane again
	@$(PY) $(K8S_CONTROLPLANE) env

cluster-down: ## stop the local control plane started by cluster-up
	@$(PY) $(K8S_CONTROLPLANE) down

demo: install k8s-tools ## local cluster + Helm chart + the tiny example; prints a curl line that gets an image
	@$(PY) -m imagefleet.devcluster.demo

chart-lint: k8s-tools ## helm lint --strict the chart, with default values and with every option on
	@BIN=$$(bash $(K8S_BUILD) bin-dir); \
	"$$BIN/helm" lint --strict charts/imagefleet && \
	"$$BIN/helm" lint --strict charts/imagefleet -f charts/imagefleet/ci/all-on-values.yaml
