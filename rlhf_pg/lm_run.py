"""A language-model run: what ``train`` (REINFORCE) and ``sft`` (maximum likelihood) both hold between steps.

``setup_run`` loads the policy (and the frozen reference when a KL term needs one), the data, the reward
functions and the optimizer, restores a checkpoint when resuming, and returns an ``LMRun``: a
``run.loop.Job`` whose evaluation, checkpoints and final save are the same for both commands; the
commands add only their ``step``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reward_models import RewardScorer

from .core.kl_control import KLController
from .data import PromptSampler, prompt_source
from .episodes.spec import EpisodeSpec
from .errors import UserError
from .evaluation import evaluate
from .models import apply_lora, enable_gradient_checkpointing, load_causal_lm, load_lora_checkpoint, load_policy
from .policy.cpu_matmul import MatmulChoice
from .policy.kernels import head_for_logprobs, sharded, uses_onednn
from .policy.prompts import check_prompt_lengths, context_length
from .policy.sampler import Sampler, SamplingParams, check_engine, make_sampler
from .recipe import Recipe
from .run import checkpoint as ckpt
from .run import fsdp
from .run.accel import new_accelerator, set_threads
from .run.loop import Job
from .run.memory import check_run_memory, keep_freed_memory, rss_bytes
from .run.optim import build_optimizer, build_scheduler
from .run.rundir import RunDir


@dataclass
class LMRun(Job):
    """Everything one LM run holds between steps (a ``Job`` for the shared loop)."""

    recipe: Recipe
    accelerator: Any
    run_dir: RunDir
    policy: Any  # prepared by accelerate (DDP-wrapped when distributed)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    prompts: PromptSampler  # the training prompts of each step (or a ReasoningGymSource: the same surface)
    scorer: RewardScorer
    eval_scorer: RewardScorer
    eval_prompts: list[str]
    eval_columns: dict[str, list[Any]]
    kl: KLController
    reference: Any  # frozen copy of the initial policy, "adapter" (LoRA: adapter disabled), or None
    max_context: int | None
    counters: dict[str, Any] = field(default_factory=dict)  # totals kept in checkpoints
    episodes: EpisodeSpec | None = None  # multi-turn episodes (tools / environment), or None
    sampler: Sampler | None = None  # the engine that draws completions (make_sampler); set by setup_run
    matmul: MatmulChoice | None = None  # train.cpu_matmul: the linear layers' CPU kernel; set by setup_run
    sharded: bool = False  # FSDP2 (run/fsdp.py): policy (and reference) parameters are DTensor shards
    final_weights: dict | None = None  # sharded: the full weights for final/, gathered onto the main process

    counter_defaults = {"tokens_total": 0, "cpu_matmul_switches": 0}

    def __post_init__(self):
        train = self.recipe.train
        self.steps, self.eval_every, self.save_every = train.steps, train.eval_every, train.save_every
        self.max_nonfinite_steps, self.tensorboard = train.max_nonfinite_steps, train.tensorboard
        self.report_to = train.report_to
        self.seed, self.is_main = self.recipe.seed, self.accelerator.is_main_process
        self.num_processes, self.process_index = self.accelerator.num_processes, self.accelerator.process_index

    @property
    def output_dir(self) -> Path:
        return self.run_dir.path

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    def sampling(self) -> SamplingParams:
        return SamplingParams.for_training(self.recipe)

    def full_weights(self):
        """Context for sampling: a sharded policy is gathered whole inside (``fsdp.gathered``), else nothing to do."""
        return fsdp.gathered(self.unwrapped) if self.sharded else contextlib.nullcontext()

    def sync_sampler(self) -> None:
        """Hand the policy's current weights to the sampler (after an optimizer step, after ``--resume``)."""
        self.sampler.update_weights(self.unwrapped)

    def close(self) -> None:
        """Free the sampler's engine (end of the run, or an error)."""
        if self.sampler is not None:
            self.sampler.close()

    def all_finished(self, finished: torch.Tensor) -> bool:
        """Stop decoding when every sequence has ended, on every process if parameters are sharded while decoding
        (ZeRO-3, FSDP outside ``full_weights``: each forward is a collective)."""
        from accelerate.utils import DistributedType

        whole = not sharded(next(self.unwrapped.parameters()))
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED and whole:
            return bool(finished.all())
        pending = (~finished).sum().reshape(1)
        return int(self.accelerator.reduce(pending, "sum")) == 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def max_over_processes(self, value: int) -> int:
        if self.num_processes == 1:
            return value
        return int(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "max"))

    # --- the Job methods shared by train and sft --------------------------------------------------------

    def after_step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Re-check the CPU matmul kernel when due (``policy/cpu_matmul.py``); a switch is said in the console.
        Returns the ``perf/cpu_matmul*`` metrics: ``perf/cpu_matmul`` is the kernel the step ran on."""
        if self.matmul is None:
            return {}
        ran_on = self.matmul.kernel
        switch = self.matmul.after_step(step, metrics.get("perf/step_s"))
        self.counters["cpu_matmul_switches"] = self.matmul.switches  # kept in checkpoints
        if switch is not None and self.console is not None and self.is_main:
            self.console.log(f"step {step}: {switch}", markup=False, highlight=False)
        return self.matmul.metrics(ran_on)

    def evaluate(self) -> dict[str, Any]:
        """Held-out evaluation; each process decodes its share of the prompts, results are gathered."""
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        prompts = self.eval_prompts[rank::world]
        columns = {key: values[rank::world] for key, values in self.eval_columns.items()}
        with self.full_weights():
            result = evaluate(self.sampler, self.unwrapped, prompts, columns, self.eval_scorer,
                              SamplingParams.for_eval(self.recipe), self.recipe.eval.batch_size,
                              seed=self.recipe.seed + rank)
        if world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(len(prompts), {k: v for k, v in result.items() if k != "examples"})])
            keys = dict.fromkeys(key for _, part in parts for key in part)  # a process may lack a task's items
            result = {**{key: sum(n * part[key] for n, part in parts if key in part)
                         / sum(n for n, part in parts if key in part) for key in keys},
                      "examples": result["examples"]}
        stats = self.reward_metrics(self.eval_scorer, "held-out evaluation")
        for term in self.eval_scorer.terms:  # unjudged by a failed source: the held-out reward is lower by them
            if term.on_error == "none":
                result[f"reward/{term.label}/failures"] = stats[f"reward/{term.label}/failures"]
        return result

    def reward_metrics(self, scorer: RewardScorer, when: str) -> dict[str, float]:
        """``scorer.take_stats()`` over every process: counts summed, ``latency_s`` the slowest process's; its notes
        (what failed, a reply that did not parse) printed by the main process, after ``when``."""
        metrics, notes = scorer.take_stats()
        if self.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(metrics, notes)])
            metrics = {key: (max if key.endswith("/latency_s") else sum)(part[0].get(key, 0.0) for part in parts)
                       for key in parts[0][0]}
            notes = [note for part in parts for note in part[1]]
        for note in notes:
            self.say(f"{when}: {note}")
        return metrics

    def say(self, line: str) -> None:
        """One line for the user, from the main process: in the run's console, or printed when it has none."""
        if not self.is_main:
            return
        if self.console is not None:
            self.console.print(line, soft_wrap=True, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def save_checkpoint(self, step: int) -> Path | None:
        """Checkpoint on the main process (all processes wait)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.sharded:  # every process writes its shards (DCP) into the staging directory first
            ckpt.save_shards(self.output_dir, step, lambda directory: fsdp.save_sharded(
                directory, self.unwrapped, self.optimizer), self.accelerator.is_main_process, self.barrier)
        if self.accelerator.is_main_process:
            state = {**self.counters, "recipe": self.recipe.to_dict(), "kl_controller": self.kl.state_dict(),
                     "prompt_source": self.prompts.state_dict(), "world_size": self.num_processes}
            model, optimizer = (self.unwrapped.config, None) if self.sharded else (self.unwrapped, self.optimizer)
            path = ckpt.save_checkpoint(self.output_dir, step, model, self.tokenizer, optimizer, self.scheduler, state,
                                        self.recipe.train.keep_checkpoints, staged=self.sharded)
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self, staging: Path, summary: dict[str, Any]) -> None:
        """The model (or LoRA adapter) and tokenizer; ``merged/`` beside them when ``peft.merge``. A sharded model is
        written from the full weights ``gather_final`` collected: an ordinary HF model either way."""
        model = self.unwrapped
        model.save_pretrained(staging, **({"state_dict": self.final_weights} if self.sharded else {}))
        self.tokenizer.save_pretrained(staging)
        if self.recipe.peft is not None and self.recipe.peft.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(staging / "merged")
            self.tokenizer.save_pretrained(staging / "merged")
            summary["merged_model_dir"] = str(self.output_dir / "final" / "merged")

    def gather_final(self) -> None:
        """Every process: a sharded policy's full weights onto the main process, for ``save_final``. The AdamW moments
        are dropped first (the final checkpoint holds them): the full copy takes their place, not a new peak."""
        if self.sharded:
            getattr(self.optimizer, "optimizer", self.optimizer).state.clear()
            self.final_weights = fsdp.full_state_dict(self.unwrapped)

    def summary(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        counters, scalars = self.counters, {k: v for k, v in after.items() if k != "examples"}
        return {
            "eval_reward_before": before["reward"],
            "eval_reward_after": after["reward"],
            **{f"eval_{k.replace('/', '_')}_before": v for k, v in before.items() if k != "reward"},
            **{f"eval_{k.replace('/', '_')}_after": v for k, v in scalars.items() if k != "reward"},
            "tokens_per_s": round(counters["tokens_total"] / counters["train_time_s"], 1) if counters["train_time_s"] else None,
            "completion_tokens": counters["tokens_total"],
            "world_size": self.accelerator.num_processes, "fsdp": self.sharded,
            "mixed_precision": self.accelerator.mixed_precision,  # train.mixed_precision: auto resolved on this machine
            "model": self.recipe.model.name_or_path,
            "cpu_matmul": "onednn" if uses_onednn(self.unwrapped) else "torch",  # the kernel in use at the end
            "cpu_matmul_switches": counters.get("cpu_matmul_switches", 0),  # auto's switches during the run
            "examples": after.get("examples", []),
        }


def setup_run(run_class: type[LMRun], recipe: Recipe, output_dir: str | Path, resume: bool = False,
              overwrite: bool = False, wants_reference: bool | None = None) -> tuple[LMRun, Path | None]:
    """Load policy, reference, data and rewards; restore a checkpoint when resuming.

    ``run_class``: the command's ``LMRun`` subclass (it adds ``step``). ``wants_reference``: load the
    frozen reference model (default: when ``algorithm.kl_coef > 0`` or ``algorithm.log_kl``); SFT passes
    False, it has no KL term.
    """
    set_threads(recipe.train.num_threads)
    check_engine(recipe.rollout.engine, installed=True)  # a missing vLLM fails before anything is loaded
    accelerator = new_accelerator(recipe.train.mixed_precision, recipe.train.distributed_timeout_s, shards_itself=True)
    sharding = fsdp.requested(recipe)  # FSDP2 (run/fsdp.py): an option it cannot run with fails before any write
    if sharding:
        fsdp.check(recipe, accelerator.num_processes)
        fsdp.load_whole_models()
        fsdp.return_freed_memory()
    elif accelerator.device.type == "cpu":
        keep_freed_memory()  # freed activations reused, not page-faulted back in every micro-batch
    # reward functions first: a bad name or a missing reward model fails before the output dir is touched
    scorer = RewardScorer(recipe.rewards)
    eval_scorer = RewardScorer(recipe.eval.rewards, "eval.rewards") if recipe.eval.rewards else scorer
    episodes = EpisodeSpec.from_recipe(recipe)  # tools / environment imported: a bad path fails before any write
    run_dir = RunDir(output_dir)
    resume_from = run_dir.prepare(recipe.to_dict(), resume, overwrite, accelerator.is_main_process, defaults=Recipe().to_dict())
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    world = accelerator.num_processes
    if recipe.rollout.prompts_per_step % world:
        raise UserError(f"rollout.prompts_per_step={recipe.rollout.prompts_per_step} must be divisible by the "
                        f"number of processes ({world})")
    saved = _checked_counters(ckpt.read_trainer_state(resume_from), resume_from) if resume_from is not None else None
    from_shards = resume_from is not None and ckpt.has_shards(resume_from)
    if sharding and resume_from is not None and not from_shards:
        raise ckpt.unusable(resume_from, "was written by a run without FSDP (a full model and optimizer.pt)", mismatch=True)
    runtime = rss_bytes()  # the process before the model: the memory estimate's R (and after it, less the weights:
    policy, tokenizer, model_path = load_policy(recipe.model)  # loading the model imports its code too)
    runtime = max(runtime, rss_bytes() - sum(p.numel() * p.element_size() for p in policy.parameters()))
    reference = None
    if wants_reference is None:  # log_kl: kl/ref even at beta = 0
        wants_reference = recipe.algorithm.kl_coef > 0 or recipe.algorithm.log_kl
    if wants_reference and recipe.peft is None:
        reference = load_causal_lm(recipe.model, model_path).eval().requires_grad_(False)
    if recipe.peft is not None:
        policy = _checkpoint_adapter(policy, resume_from) if resume_from else apply_lora(policy, recipe.peft)
        reference = "adapter" if wants_reference else None
    elif resume_from is not None and not from_shards:  # (shards are loaded below, into the optimizer's parameters)
        policy = _checkpoint_policy(recipe, resume_from, policy)
    if recipe.train.gradient_checkpointing:  # on the model the run trains (a resumed one, or LoRA's base)
        enable_gradient_checkpointing(policy.get_base_model() if recipe.peft is not None else policy)
    prompts, eval_prompts, eval_columns = prompt_source(recipe.data, recipe.rollout.prompts_per_step,
                                                       recipe.data.shuffle_seed + recipe.seed)
    if saved is not None:
        prompts.load_state_dict(saved.get("prompt_source"))  # a curriculum's levels
    max_context = context_length(policy)
    chat = recipe.data.chat_template_kwargs
    prompt_tokens = check_prompt_lengths(tokenizer, prompts.known_prompts(), recipe.rollout.max_new_tokens,
                                         max_context, "rollout.max_new_tokens", chat_template_kwargs=chat)
    if recipe.train.check_memory:  # a run that cannot fit stops here, not at step 1 by the OOM killer
        check_run_memory(recipe, policy, prompt_tokens, accelerator, runtime, head_for_logprobs(policy), sharding)
    check_prompt_lengths(tokenizer, eval_prompts, recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens,
                         max_context, "eval.max_new_tokens" if recipe.eval.max_new_tokens else "rollout.max_new_tokens",
                         chat_template_kwargs=chat)
    if sharding:  # the optimizer is built on the shards: each process keeps the AdamW states of its shards only
        policy = fsdp.shard(policy.to(accelerator.device), accelerator.device.type, accelerator.mixed_precision)
        if isinstance(reference, torch.nn.Module):
            reference = fsdp.shard(reference.to(accelerator.device), accelerator.device.type,
                                   accelerator.mixed_precision, name="the reference model")
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], recipe.optim,
                                fused=accelerator.device.type == "cpu" and accelerator.distributed_type.value in ("NO", "MULTI_CPU"))
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.train.steps)
    if not sharding:  # (accelerate would wrap a sharded model in DDP on CPU)
        policy, optimizer = accelerator.prepare(policy, optimizer)
    if isinstance(reference, torch.nn.Module) and not sharding:
        reference = reference.to(accelerator.device)
    # train.cpu_matmul: the linear layers' CPU kernel, chosen now and (auto) re-checked between steps
    decode_rows = recipe.rollout.prompts_per_step // world * recipe.rollout.completions_per_prompt
    matmul = MatmulChoice(recipe.train.cpu_matmul, [accelerator.unwrap_model(policy), reference], decode_rows)
    kl = KLController(recipe.algorithm.kl_coef, recipe.algorithm.kl_target, recipe.algorithm.kl_horizon)
    if from_shards:
        fsdp.resume(resume_from, accelerator.unwrap_model(policy), optimizer, saved.get("world_size"), world,
                    accelerator.is_main_process)
    if resume_from is not None:
        ckpt.load_training_state(resume_from, optimizer, scheduler)
        kl.load_state_dict(saved.get("kl_controller", kl.state_dict()))
    run = run_class(
        recipe=recipe, accelerator=accelerator, run_dir=run_dir, policy=policy, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler, sharded=sharding, prompts=prompts,
        scorer=scorer, eval_scorer=eval_scorer, eval_prompts=eval_prompts, eval_columns=eval_columns, kl=kl,
        reference=reference, max_context=max_context, episodes=episodes, matmul=matmul,
    )
    run.sampler = make_sampler(recipe, run.unwrapped, tokenizer, episodes=episodes, all_finished=run.all_finished)
    if resume_from is not None:
        run.sync_sampler()  # an engine with its own copy of the weights starts from the checkpoint's
    run.init_counters(saved)
    matmul.switches = int(run.counters["cpu_matmul_switches"])  # a resumed run counts on
    if accelerator.is_main_process:
        run_dir.write_marker(recipe.to_dict())
    accelerator.wait_for_everyone()
    return run, resume_from


def _checked_counters(state: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The counters of ``trainer_state.json``, each a number (or null where allowed), else a clear error."""
    numbers = {"global_step": 0, "eval_reward_before": None, "last_eval": None, "nonfinite_in_a_row": 0,
               "skipped_updates": 0, "train_time_s": 0.0, "wall_time_s": 0.0, "tokens_total": 0,
               "cpu_matmul_switches": 0}
    for key, default in numbers.items():
        value = state.get(key, default)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number or (default is None and value is None)):
            raise ckpt.unusable(checkpoint, f"has a corrupt trainer_state.json ({key}={value!r:.40})")
    controller = state.get("kl_controller", {"coef": 0.0})
    coef = controller.get("coef") if isinstance(controller, dict) else None
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not math.isfinite(coef):
        raise ckpt.unusable(checkpoint, f"has a corrupt trainer_state.json (kl_controller={controller!r:.40})")
    return state


def _checkpoint_adapter(base, checkpoint: Path):
    try:
        return load_lora_checkpoint(base, str(checkpoint))
    except UserError as error:
        raise ckpt.unusable(checkpoint, f"is unusable ({error})", mismatch=True) from None


def _checkpoint_policy(recipe: Recipe, checkpoint: Path, base):
    """The full model saved in ``checkpoint``; it must have the shapes of the recipe's model ``base``."""
    try:
        policy = load_causal_lm(recipe.model, str(checkpoint))
    except UserError as error:
        raise ckpt.unusable(checkpoint, f"holds a model that does not load ({error})") from None
    expected = {name: tuple(t.shape) for name, t in base.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in policy.state_dict().items()}
    if expected != found:
        name = next((n for n in expected if found.get(n) != expected[n]), None) or next(iter(set(found) - set(expected)))
        raise ckpt.unusable(checkpoint, f"holds a different model than {recipe.model.name_or_path!r} ({name}: "
                                        f"{found.get(name)} there, {expected.get(name)} in the recipe's model)",
                            mismatch=True)
    return policy


def evaluate_model(recipe: Recipe, model_dir: str | None = None) -> dict[str, Any]:
    """``rlhf-pg eval``: evaluate ``model_dir`` (default: the recipe's model) on the recipe's held-out prompts."""
    model_config = copy.deepcopy(recipe.model)
    if model_dir is not None:
        model_config.name_or_path = model_dir
    model, tokenizer, _ = load_policy(model_config)
    _, prompts, columns = prompt_source(recipe.data, recipe.rollout.prompts_per_step, recipe.data.shuffle_seed + recipe.seed)
    scorer = RewardScorer(recipe.eval.rewards or recipe.rewards)
    params = SamplingParams.for_eval(recipe)
    check_prompt_lengths(tokenizer, prompts, params.max_new_tokens, context_length(model),
                         "eval.max_new_tokens" if recipe.eval.max_new_tokens else "rollout.max_new_tokens",
                         chat_template_kwargs=recipe.data.chat_template_kwargs)
    sampler = make_sampler(recipe, model, tokenizer)
    try:
        result = evaluate(sampler, model, prompts, columns, scorer, params, recipe.eval.batch_size, recipe.seed)
    finally:
        sampler.close()
    result["num_prompts"] = len(prompts)
    result["model"] = model_config.name_or_path
    _, notes = scorer.take_stats()
    if notes:
        result["reward_notes"] = notes  # samples a failed source left unjudged, replies that did not parse
    return result
