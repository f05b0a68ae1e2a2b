"""The inference pod: one process per GPU serving the OpenAI Images API.

Requests become samples, compatible samples are batched into one diffusers call on a single GPU
worker thread, and images are encoded on a CPU pool while the next batch runs. Layers, from the
outside in:

* :mod:`.app`, :mod:`.routes`, :mod:`.handlers` -- the aiohttp application (thin),
* :mod:`.scheduler` -- the async owner of the queue: admission, batching, cancellation, results,
* :mod:`.batching`, :mod:`.costs` -- pure batch-forming policy and learned batch costs,
* :mod:`.worker` -- the GPU thread: runs a batch, splits it on out-of-memory,
* :mod:`.models`, :mod:`.tiny`, :mod:`.synthetic` -- building or loading diffusers pipelines,
* :mod:`.encoding`, :mod:`.files`, :mod:`.telemetry`, :mod:`.stats` -- outputs and observability.
"""
