"""Kubernetes operator for MoEDeployment: keeps expert placement near optimal, rolls it out
safely through a ConfigMap. Layers: ``spec``/``nodes``/``loadsource``/``kube`` (typed models
and API clients), ``build`` (pure decisions and manifests), ``reconcile`` and ``handlers``
(thin kopf glue), ``__main__`` (entry point)."""
