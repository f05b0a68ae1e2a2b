"""imagefleet: self-hosted image generation that scales out.

The top-level package is the small shared core that the three components build on:

* :mod:`imagefleet.schema`   -- the Images API request fields and their validation,
* :mod:`imagefleet.errors`   -- typed errors and OpenAI's error envelope,
* :mod:`imagefleet.settings` -- one typed settings object per process, parsed once,
* :mod:`imagefleet.loadreport` -- the load report a pod publishes and a router reads,
* :mod:`imagefleet.metrics`  -- the Prometheus metric names that form a contract,
* :mod:`imagefleet.cli`      -- the ``imagefleet`` command.

The components live beside it and never import each other:
``imagefleet.inference_pod``, ``imagefleet.router`` and ``imagefleet.operator``.
"""

__version__ = "0.1.0"
