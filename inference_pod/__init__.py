"""The inference pod: one process per GPU serving the OpenAI Images API.

Requests become samples, compatible samples are batched into one diffusers call on a single GPU
worker thread, and images are encoded on a CPU pool while the next batch runs. Layers, from the
outside in:

* :mod:`.app`, :mod:`.routes`, :mod:`.handlers` -- the aiohttp application (thin): read, parse,
  call, render; :mod:`.forms` reads multipart bodies, :mod:`.responses` renders images;
* :mod:`.state`, :mod:`.phase` -- where the pod stands (loading, failed, serving, draining,
  quarantined) and the serving record; :mod:`.reports` -- load report, ``/stats``, gauges;
* :mod:`.service` -- the image service: support checks, defaults, submit, wait-with-cancel;
* :mod:`.scheduler` -- the facade over the batching core: :mod:`.batchstate` (queue, jobs, next
  batch; synchronous), :mod:`.batchloop` (the one task running batches), :mod:`.delivery`
  (encode, resolve, fail), :mod:`.health`, :mod:`.estimator`;
* :mod:`.batching`, :mod:`.costs` -- pure batch-forming policy and learned batch costs;
* :mod:`.worker` -- the GPU thread: runs a batch, splits it on out-of-memory; :mod:`.stepbatch`
  and :mod:`.steploop` -- step-level batches (``--batch-mode step``), on the GPU thread and on
  the event loop; :mod:`.faults` --
  the fault-injection test hook around it; :mod:`.warmup` -- the start-up batches;
* :mod:`.models`, :mod:`.tiny`, :mod:`.synthetic`, :mod:`.chartokenizer` -- building or loading
  diffusers pipelines;
* :mod:`.encoding`, :mod:`.uploads`, :mod:`.files` -- images in and out;
  :mod:`.counters`, :mod:`.telemetry` -- counts, and their Prometheus view.
"""
