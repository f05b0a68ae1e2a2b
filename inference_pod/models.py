"""Building or loading the diffusers pipeline a pod serves, and what the API needs to know of it.

``--model`` accepts:

* ``tiny`` -- a tiny random pipeline for tests and CPU demos (:mod:`.tiny`);
* ``synthetic:<arch>`` -- random weights of a real architecture, created directly on the target
  device, for benchmarks: same compute as the real weights (:mod:`.synthetic`);
* anything else -- a Hugging Face id or a local directory, through ``DiffusionPipeline.from_pretrained``.

Image-to-image and inpainting pipelines are made from the loaded components with
``AutoPipelineFor*.from_pipe`` (no second copy of the weights) while the model loads, so the pod
knows which edits the model can make and each edit pipeline's default ``strength`` before the
first request (an edit must leave at least one denoising step:
:func:`imagefleet.schema.check_denoising_steps`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imagefleet.inference_pod import acceleration, encodergraphs
from imagefleet.inference_pod.acceleration import Acceleration, StepCache
from imagefleet.inference_pod.prompts import FAMILIES as NEGATIVE_REUSE_FAMILIES
from imagefleet.inference_pod.prompts import EmptyNegative
from imagefleet.schema import Defaults
from imagefleet.settings import PodSettings

log = logging.getLogger(__name__)

TASKS = ("generate", "img2img", "inpaint")

COMPILE_MODES = {"blocks": "default", "blocks-graphs": "reduce-overhead"}
"""The ``--compile`` settings that compile, and the torch.compile mode each reports in ``/v1/models``."""

# family -> (default steps, default guidance scale)
FAMILY_DEFAULTS: dict[str, tuple[int, float]] = {
    "tiny": (4, 5.0),
    "sd": (30, 7.5),
    "sdxl": (30, 5.0),
    "sd3": (28, 4.5),
    "flux": (28, 3.5),
}
GENERIC_DEFAULTS = (30, 5.0)


@dataclass(frozen=True)
class ModelInfo:
    """What the API, the batcher and the load report need to know about the served model."""

    id: str
    family: str
    source: str  # "built-in", "synthetic", "huggingface", "local"
    random_weights: bool
    device: str
    dtype: str
    size_multiple: int
    defaults: Defaults
    """The model's own defaults; the pod's settings may override them (:func:`imagefleet.schema.model_defaults`)."""
    supports_negative_prompt: bool
    tasks: tuple[str, ...] = TASKS
    strengths: dict[str, float] = field(default_factory=dict)
    """The default ``strength`` of each edit pipeline ("img2img", "inpaint") that has one."""


@dataclass
class LoadedModel:
    info: ModelInfo
    text2img: Any
    acceleration: Acceleration = field(default_factory=Acceleration)
    step_cache: StepCache | None = None
    """The fast tier's cache on the denoiser, when the pod serves that tier."""
    empty_negative: EmptyNegative | None = None
    """The empty negative prompt's embeddings, encoded once (families that take them)."""
    _derived: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pipeline(self, task: str) -> Any:
        """The pipeline for ``task``, made from the loaded components on first use."""
        if task == "generate":
            return self.text2img
        with self._lock:
            if task not in self._derived:
                from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

                factory = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
                derived = factory.from_pipe(self.text2img)
                derived.set_progress_bar_config(disable=True)
                self._derived[task] = derived
            return self._derived[task]

    def tier(self, name: str) -> AbstractContextManager[None]:
        """Context for a pipeline call of tier ``name`` (the fast tier's cache on, or nothing)."""
        if name == "fast" and self.step_cache is not None:
            return self.step_cache.active()
        return nullcontext()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load(settings: PodSettings) -> LoadedModel:
    """Build or load the pipeline named by ``settings.model`` (blocking; call off the event loop)."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    name = settings.model
    if name == "tiny":
        from imagefleet.inference_pod import tiny

        pipe, source, random_weights = tiny.build(device, dtype), "built-in", True
    elif name.startswith("synthetic:"):
        from imagefleet.inference_pod import synthetic

        pipe, source, random_weights = (
            synthetic.build(name.partition(":")[2], device, dtype),
            "synthetic",
            True,
        )
    else:
        from diffusers import DiffusionPipeline

        source = "local" if Path(name).exists() else "huggingface"
        pipe = DiffusionPipeline.from_pretrained(
            name, dtype=dtype, revision=settings.revision, variant=settings.variant
        ).to(device)
        random_weights = False
    pipe.set_progress_bar_config(disable=True)
    accel, step_cache = accelerate(pipe, settings, device)
    info = describe(
        pipe, model_id=name, source=source, random_weights=random_weights, device=device, dtype=dtype
    )
    if random_weights:
        log.warning("Serving %s with RANDOM WEIGHTS: images are noise, timings are real", name)
    log.info("Loaded %s (%s, %s on %s; %s)", name, info.family, info.dtype, device, accel.to_json())
    model = LoadedModel(info=info, text2img=pipe, acceleration=accel, step_cache=step_cache)
    if info.family in NEGATIVE_REUSE_FAMILIES:
        model.empty_negative = EmptyNegative()
    model.info = derive_edit_pipelines(model)
    return model


def derive_edit_pipelines(model: LoadedModel) -> ModelInfo:
    """Make the edit pipelines now; the model's info, less the tasks it cannot do, with their
    default strengths."""
    tasks, strengths = ["generate"], {}
    for task in TASKS[1:]:
        try:
            pipe = model.pipeline(task)
        except Exception as exc:  # diffusers has no such pipeline for this model
            log.warning("%s cannot %s: %s", model.info.id, task, exc)
            continue
        tasks.append(task)
        default = getattr(inspect.signature(pipe.__call__).parameters.get("strength"), "default", None)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            strengths[task] = float(default)
    return dataclasses.replace(model.info, tasks=tuple(tasks), strengths=strengths)


def accelerate(pipe: Any, settings: PodSettings, device: str) -> tuple[Acceleration, StepCache | None]:
    """The lossless rewrites the settings ask for, then the fast tier's cache (order matters:
    the cache wraps the compiled blocks). See :mod:`.acceleration`."""
    graphed = encodergraphs.graph_encoders(pipe, device) if settings.encoder_graphs else 0
    denoiser = acceleration.denoiser_of(pipe)
    if denoiser is None:
        return Acceleration(graphed_encoders=graphed), None
    fused = acceleration.fuse_qkv(denoiser) if settings.fuse_projections else 0
    gelus = acceleration.fuse_gelu(denoiser) if settings.fuse_gelu else 0
    mode = settings.compile
    if mode == "auto":
        mode = "blocks" if device.startswith("cuda") else "off"
    compiled, decoder = 0, False
    tuned = (
        device.startswith("cuda")
        and settings.tune_decoder
        and acceleration.tune_decoder(getattr(pipe, "vae", None))
    )
    if mode in COMPILE_MODES:
        acceleration.use_compile_cache(settings.compile_cache_dir)
        compiled = acceleration.compile_blocks(denoiser, graphs=mode == "blocks-graphs")
        decoder = acceleration.compile_decoder(getattr(pipe, "vae", None))
    # only fused joint attentions can take FlashAttention-4: under auto, a model without them does
    # not import it
    wanted = settings.attention if fused or settings.attention == "fa4" else "sdpa"
    kernel = acceleration.choose_attention(wanted, device)
    if kernel == "fa4" and not acceleration.use_attention(denoiser, kernel):
        raise ValueError(
            f"attention fa4 runs the fused joint attention of SD3-family transformers; {settings.model} has none"
        )
    step_cache = None
    if "fast" in settings.tiers.split(","):
        if not StepCache.supported(denoiser):
            raise ValueError(
                f"the fast tier needs a transformer with repeated blocks; {settings.model} has none"
            )
        step_cache = StepCache(
            denoiser,
            policy=settings.fast_policy,
            interval=settings.fast_interval,
            threshold=settings.fast_threshold,
        )
    accel = Acceleration(
        fused_attentions=fused,
        fused_gelus=gelus,
        compiled_blocks=compiled,
        compiled_decoder=decoder,
        tuned_decoder=tuned,
        compile_mode=COMPILE_MODES[mode] if compiled else None,
        step_cache=step_cache is not None,
        attention=kernel,
        graphed_encoders=graphed,
    )
    return accel, step_cache


def family_of(pipe: Any) -> str:
    cls = type(pipe).__name__
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    if cls.startswith("StableDiffusionXL"):
        return "sdxl"
    if cls.startswith("Flux"):
        return "flux"
    if cls.startswith("StableDiffusion"):
        return "sd"
    return "other"


def describe(
    pipe: Any, *, model_id: str, source: str, random_weights: bool, device: str, dtype: torch.dtype
) -> ModelInfo:
    family = "tiny" if model_id == "tiny" else family_of(pipe)
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    patch = int(getattr(getattr(denoiser, "config", None), "patch_size", 1) or 1)
    multiple = vae_factor * patch
    sample = getattr(pipe, "default_sample_size", None) or getattr(
        getattr(denoiser, "config", None), "sample_size", None
    )
    side = int(sample or 64) * vae_factor
    steps, guidance = FAMILY_DEFAULTS.get(family, GENERIC_DEFAULTS)
    accepts_negative = "negative_prompt" in inspect.signature(pipe.__call__).parameters
    return ModelInfo(
        id=model_id,
        family=family,
        source=source,
        random_weights=random_weights,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        size_multiple=multiple,
        defaults=Defaults(size=(side, side), steps=steps, guidance=guidance),
        supports_negative_prompt=accepts_negative,
    )
