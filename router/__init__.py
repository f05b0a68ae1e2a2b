"""The router: one address in front of every pod of one model, sending each request to the pod
where it will wait least.

Layers, from the outside in:

* :mod:`.app`, :mod:`.routes`, :mod:`.handlers` -- the aiohttp application (thin),
* :mod:`.proxy` -- one request's attempts: pick, send, retry elsewhere, relay, time out,
* :mod:`.poller`, :mod:`.discovery` -- keeping the backend set and their load reports current,
* :mod:`.loadview`, :mod:`.pick`, :mod:`.health`, :mod:`.cost` -- pure: the view of each
  backend's load, choosing among them, ejection and backoff, pricing a request,
* :mod:`.auth`, :mod:`.stats`, :mod:`.telemetry`, :mod:`.files`, :mod:`.forms` -- API keys,
  ``/stats`` aggregation, ``/metrics``, file ids that name their pod, multipart fields.
"""
