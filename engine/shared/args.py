"""Every setting of the engine, in one dataclass, validated once and passed to every process."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from engine.shared.model_config import check_model_config
from engine.shared.pooling import read_pooling_config
from engine.shared.quant_config import KV_CACHE_DTYPES, fp8_scheme

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")
_LOAD_FORMATS = ("auto", "dummy")
_ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")
_DECODE_ATTENTION_BACKENDS = (None, "flashinfer", "triton")  # None: "triton" where the model allows
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SCHEDULE_POLICIES = ("lpm", "fcfs")  # lpm without the prefix cache is fcfs (every match is empty)


@dataclass
class EngineArgs:
    """Settings of one engine. Field docstrings are the comments on each line."""

    model_path: Optional[str] = None  # HF folder, GGUF file or folder; None: the default SmolLM2-135M-Instruct
    tokenizer_path: Optional[str] = None  # defaults to model_path
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    context_length: Optional[int] = None  # defaults to the model's max_position_embeddings
    allow_long_context: bool = False  # let context_length exceed the model's max_position_embeddings (untrained)
    max_running_requests: Optional[int] = None  # None: 1024 on GPU, 64 on CPU; never more than the KV pool's tokens
    max_total_tokens: Optional[int] = None  # caps the KV pool size in tokens
    max_prefill_tokens: int = 16384  # token budget of one prefill step
    chunked_prefill_size: Optional[int] = None  # None: 16384 on GPU, 512 on CPU; -1 disables chunking
    disable_radix_cache: bool = False  # no prefix cache: every request computes its whole prompt
    schedule_policy: str = "lpm"  # order of waiting requests: "lpm" (longest cached prefix first) or "fcfs"
    load_format: str = "auto"  # "dummy": random weights from config.json alone
    mem_fraction_static: float = 0.85  # share of GPU memory for weights + KV pool
    gpu_reserve_bytes: int = 2 << 30  # of that share, kept out of the KV pool: activations, sampling, workspaces
    cpu_kv_pool_bytes: int = 1 << 30  # KV pool size on CPU when max_total_tokens is not given
    # Largest decode batch replayed from a CUDA graph; None: max_running_requests (every decode step: an eager
    # step of 1,024 requests spent 14 ms launching its kernels on the H200's host, a graph replay under 1 ms).
    cuda_graph_max_bs: Optional[int] = None
    disable_cuda_graph: bool = False  # run decode eagerly
    disable_overlap_schedule: bool = False  # read each step's outputs before scheduling the next
    profile_steps: int = 0  # record device/host time of up to this many steps (server info "step_profile")
    attention_backend: str = "auto"  # auto: flashinfer on GPU when installed, else torch
    # Decode steps under flashinfer: "triton" (ferry's kernel, no per-step plan) or "flashinfer"; None: Triton
    # where the model allows (no sliding window or soft cap), else flashinfer.
    decode_attention_backend: Optional[str] = None
    quantization: Optional[str] = None  # "fp8": bf16/fp16 weights quantized to FP8 e4m3 as they load
    kv_cache_dtype: str = "auto"  # "fp8_e4m3": the KV pool in FP8 (twice the tokens); auto: the model's dtype
    return_hidden_states: bool = False  # default for requests that do not say
    is_embedding: bool = False  # an embedding model: Engine.encode() pools prompts' hidden states; no generate()
    grammar_cache_size: int = 256  # compiled grammars (json_schema / regex / ebnf) kept, by their text
    constrained_json_disable_any_whitespace: bool = False  # json_schema outputs on one line, ", " and ": " between
    random_seed: int = 0  # seeds dummy weights and unseeded sampling
    tp_size: int = 1  # tensor parallelism: GPUs (or CPU processes) that share one model, one process each
    dp_size: int = 1  # data parallelism: scheduler replicas of tp_size ranks each, behind one frontend
    base_gpu_id: int = 0  # rank r of replica i runs on cuda:(base_gpu_id + i * tp_size + r)
    nnodes: int = 1  # machines the tp_size ranks span; node 0 runs the frontend, the others only ranks
    node_rank: int = 0  # this machine's place among the nnodes (0: the one that serves requests)
    dist_init_addr: Optional[str] = None  # "host:port" of node 0, where every node's ranks meet (nnodes > 1)
    log_level: str = "info"  # logging level of every process; "warning" quiets the start-up lines
    cache_dir: Optional[str] = None  # where converted models go; default ~/.cache/ferry
    startup_timeout: float = 600.0  # seconds to wait for the child processes to be ready

    def validate(self) -> None:
        """Raise ValueError naming the field for any out-of-range setting."""
        _choice("dtype", self.dtype, _DTYPES)
        _choice("device", self.device, _DEVICES)
        _choice("load_format", self.load_format, _LOAD_FORMATS)
        _choice("attention_backend", self.attention_backend, _ATTENTION_BACKENDS)
        _choice("decode_attention_backend", self.decode_attention_backend, _DECODE_ATTENTION_BACKENDS)
        _choice("log_level", self.log_level.lower(), _LOG_LEVELS)
        _choice("schedule_policy", self.schedule_policy, _SCHEDULE_POLICIES)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        fp8_scheme({}, self.quantization)  # quantization names a method ferry has
        for name in ("disable_radix_cache", "allow_long_context"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("context_length", "max_running_requests", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.max_prefill_tokens, int) or self.max_prefill_tokens <= 0:
            raise ValueError(f"max_prefill_tokens must be a positive int, got {self.max_prefill_tokens!r}")
        chunk = self.chunked_prefill_size
        if chunk is not None and (not isinstance(chunk, int) or (chunk <= 0 and chunk != -1)):
            raise ValueError(f"chunked_prefill_size must be a positive int, -1 or None, got {chunk!r}")
        if not 0.0 < float(self.mem_fraction_static) < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static!r}")
        reserve, cpu_pool = self.gpu_reserve_bytes, self.cpu_kv_pool_bytes
        if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
            raise ValueError(f"gpu_reserve_bytes must be a non-negative int, got {reserve!r}")
        if not isinstance(cpu_pool, int) or isinstance(cpu_pool, bool) or cpu_pool <= 0:
            raise ValueError(f"cpu_kv_pool_bytes must be a positive int, got {cpu_pool!r}")
        bs = self.cuda_graph_max_bs
        if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
            raise ValueError(f"cuda_graph_max_bs must be a positive int or None, got {bs!r}")
        if not isinstance(self.is_embedding, bool):
            raise ValueError(f"is_embedding must be a bool, got {self.is_embedding!r}")
        if not isinstance(self.disable_overlap_schedule, bool):
            raise ValueError(f"disable_overlap_schedule must be a bool, got {self.disable_overlap_schedule!r}")
        if not isinstance(self.constrained_json_disable_any_whitespace, bool):
            value = self.constrained_json_disable_any_whitespace
            raise ValueError(f"constrained_json_disable_any_whitespace must be a bool, got {value!r}")
        if not isinstance(self.grammar_cache_size, int) or self.grammar_cache_size < 1:
            raise ValueError(f"grammar_cache_size must be a positive int, got {self.grammar_cache_size!r}")
        if not isinstance(self.profile_steps, int) or self.profile_steps < 0:
            raise ValueError(f"profile_steps must be a non-negative int, got {self.profile_steps!r}")
        if not isinstance(self.tp_size, int) or isinstance(self.tp_size, bool) or self.tp_size < 1:
            raise ValueError(f"tp_size must be a positive int, got {self.tp_size!r}")
        if not isinstance(self.base_gpu_id, int) or isinstance(self.base_gpu_id, bool) or self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id must be a non-negative int, got {self.base_gpu_id!r}")
        self._validate_scale_out()
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {self.startup_timeout!r}")

    def _validate_scale_out(self) -> None:
        """dp_size, and tensor parallelism over nnodes machines (SGLang's names and meaning)."""
        for name in ("dp_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        rank = self.node_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.nnodes:
            raise ValueError(f"node_rank must be an int in [0, nnodes={self.nnodes}), got {rank!r}")
        if self.nnodes == 1:
            return
        if self.tp_size % self.nnodes:
            raise ValueError(f"tp_size={self.tp_size} must be a multiple of nnodes={self.nnodes} (ranks per node)")
        if self.dp_size > 1:
            raise ValueError(f"dp_size={self.dp_size} with nnodes={self.nnodes}: replicas span one machine only")
        host, _, port = (self.dist_init_addr or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"dist_init_addr must be 'host:port' of node 0 when nnodes > 1, got {self.dist_init_addr!r}"
            )

    @property
    def ranks_per_node(self) -> int:
        """Tensor-parallel ranks on each machine."""
        return self.tp_size // self.nnodes

    def node_ranks(self) -> range:
        """The tensor-parallel ranks this machine runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def for_replica(self, dp_rank: int) -> EngineArgs:
        """The settings of scheduler replica dp_rank: its ranks on the GPUs after the earlier replicas'."""
        if dp_rank == 0:
            return self
        return dataclasses.replace(self, base_gpu_id=self.base_gpu_id + dp_rank * self.tp_size)

    def resolve(self) -> EngineArgs:
        """Fill in what `auto` and None mean on this machine; returns a new, validated EngineArgs."""
        from engine.shared.model_files import resolve_model_path

        self.validate()
        if self.device == "cuda":  # before any work: no model download, conversion or child process first
            _check_cuda()
        resolved = dataclasses.replace(self)
        resolved.model_path = resolve_model_path(self.model_path, self.cache_dir)
        if self.tokenizer_path:
            resolved.tokenizer_path = resolve_model_path(self.tokenizer_path, self.cache_dir)
        elif _has_tokenizer(resolved.model_path):
            resolved.tokenizer_path = resolved.model_path
        else:  # a config-only folder (speed work with random weights): borrow the default tokenizer
            logger.warning("no tokenizer in %s; using the default model's tokenizer", resolved.model_path)
            resolved.tokenizer_path = resolve_model_path(None, self.cache_dir)
        if resolved.device == "auto":
            resolved.device = "cuda" if _cuda_available() else "cpu"
        on_torch = resolved.device == "cpu" or resolved.attention_backend == "torch"
        if resolved.decode_attention_backend == "triton" and on_torch:
            raise ValueError("decode_attention_backend='triton' needs the GPU and its flashinfer attention backend")
        if resolved.dtype == "auto":
            resolved.dtype = "bfloat16" if resolved.device == "cuda" else "float32"
        if resolved.chunked_prefill_size is None:
            resolved.chunked_prefill_size = 16384 if resolved.device == "cuda" else 512
        if resolved.max_running_requests is None:
            resolved.max_running_requests = 1024 if resolved.device == "cuda" else 64
        config = read_model_config(resolved.model_path)
        model_max = int(config.get("max_position_embeddings", 4096))
        if resolved.context_length is None:
            resolved.context_length = model_max
        elif resolved.context_length > model_max and not resolved.allow_long_context:
            raise ValueError(
                f"context_length={resolved.context_length} is above the model's maximum of {model_max} tokens "
                "(max_position_embeddings in its config.json): positions past it were never trained. "
                "Pass allow_long_context=True to run with it anyway."
            )
        check_model_config(config)
        fp8_scheme(config, resolved.quantization)
        if resolved.is_embedding:
            read_pooling_config(resolved.model_path)  # a pooling ferry lacks is refused here
        _check_tp_shape(resolved.tp_size, config)
        if resolved.device == "cuda":
            _check_gpu_count(resolved.base_gpu_id + resolved.dp_size * resolved.ranks_per_node)
        resolved.log_level = resolved.log_level.lower()
        return resolved

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineArgs:
        return cls(**json.loads(text))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(EngineArgs)]


def read_model_config(model_dir: str) -> dict[str, Any]:
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    # Multimodal configs nest the language model's settings, beside the vision tower's and the image
    # token ids (kept, for the model); the text settings win where both levels have a key.
    text = config.get("text_config", config)
    outer = {k: v for k, v in config.items() if k != "text_config"}
    return outer | text | {"architectures": config.get("architectures")}


def _check_tp_shape(tp_size: int, config: dict[str, Any]) -> None:
    """tp_size must split the attention heads and the MLP evenly; KV heads are split when there are
    at least tp_size of them and replicated (each rank keeps the one its query heads read) otherwise."""
    if tp_size == 1:
        return
    heads = int(config.get("num_attention_heads", 0))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    intermediate = int(config.get("intermediate_size", 0))
    checked = [("num_attention_heads", heads), ("intermediate_size", intermediate)]
    if config.get("moe_intermediate_size"):  # each expert's MLP is split like the dense one
        checked.append(("moe_intermediate_size", int(config["moe_intermediate_size"])))
    for name, value in checked:
        if value % tp_size:
            raise ValueError(f"tp_size={tp_size} does not divide the model's {name}={value}")
    if (kv_heads >= tp_size and kv_heads % tp_size) or (kv_heads < tp_size and tp_size % kv_heads):
        raise ValueError(f"tp_size={tp_size} must divide, or be a multiple of, num_key_value_heads={kv_heads}")


def _check_cuda() -> None:
    """device="cuda" needs a CUDA build of torch and a visible NVIDIA device; say which is missing, at once."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = ""
    if torch_version.endswith("+cpu"):
        raise ValueError(f"device='cuda', but CUDA is not available: torch {torch_version} is a CPU-only build")
    if not _cuda_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (
            f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
            if visible in ("", "-1")
            else "no NVIDIA driver or GPU on this machine (/dev/nvidia0 is missing)"
        )
        raise ValueError(f"device='cuda', but CUDA is not available: {why}")


def _check_gpu_count(needed: int) -> None:
    # Counted from the driver's device nodes, as _cuda_available does, to keep torch out of the frontend.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([d for d in visible.split(",") if d.strip()])
    else:
        count = len([n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()])
    if count and needed > count:  # 0: no device nodes to count (a container without them); torch will tell
        raise ValueError(f"base_gpu_id + dp_size * tp_size (per node) needs {needed} GPUs; {count} are visible")


def _has_tokenizer(model_dir: str) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    return any(os.path.exists(os.path.join(model_dir, name)) for name in names)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _cuda_available() -> bool:
    # Asking torch would import it (seconds) and initialise CUDA in the frontend; the driver's
    # device nodes answer the same question for free.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")
