"""``LLMEngine``: add requests, step, abort — the loop every face of pagedq drives.

One :meth:`LLMEngine.step` is: schedule (CPU bookkeeping) → run the model once over the packed
batch → sample → append tokens, detokenize incrementally, check stop conditions → free the
blocks of finished sequences. Bad requests are rejected in :meth:`add_request` with a
``ValueError`` before anything is queued, so the requests already running are never disturbed.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

import torch

from . import detokenizer
from .beam_search import BeamSearch
from .block_manager import BlockManager
from .checks import check_text, check_token_ids
from .config import EngineConfig, resolve_device, resolve_dtype
from .kernels import native
from .metrics import UserStats, latency_histograms
from .model_runner import ModelRunner
from .models import read_config
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .policies import make_policy
from .sampler import Sampler
from .sampling_params import BeamSearchParams, SamplingParams
from .scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from .sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict
ParamsType = SamplingParams | BeamSearchParams


@dataclass
class _StepPlan:
    """The rows of one model step that the engine reads back: ``rows`` = the sampled rows
    (one per sequence in ``samplers``) then the prompt-logprob rows (``prompt_targets``)."""

    step: SchedulerOutput
    sample_rows: list[int] = field(default_factory=list)
    samplers: list[Sequence] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[tuple[Request, int]] = field(default_factory=list)
    prompt_done: dict[str, int] = field(default_factory=dict)  # request id -> positions scored after it
    num_tokens: int = 0

    @property
    def rows(self) -> list[int]:
        return self.sample_rows + self.prompt_rows


# Without num_kv_blocks or kv_cache_memory, the pool takes what max_num_seqs sequences of
# max_model_len tokens need, but no more than this share of the device's memory.
_DEFAULT_CPU_KV_SHARE = 0.25
_DEFAULT_CPU_KV_CAP = 4 * 2**30
_DEFAULT_GPU_KV_SHARE = 0.85
# a prompt longer than this many characters per token of max_model_len is tokenized in part first
_CHARS_PER_TOKEN_BOUND = 16


def resolve_model_dir(model: str) -> str:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a path to a Hugging Face model folder, got {model!r}")
    from .models import default

    if model == default.NAME and not os.path.isdir(model):
        return default.path()  # the trained model shipped inside the package
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise ValueError(
            f"model folder {model!r} does not exist; pass a local folder with config.json and *.safetensors "
            "(pagedq never downloads weights; `pagedq build-model tiny DIR` makes a small random one)"
        )
    return path


# Tokens per step unless the caller says, on every device (vLLM's CPU build uses 2048 for its
# server and 4096 for its ``LLM`` class). A budget that admits every waiting prompt early lets
# the decode steps run full batches, and a decode step reads the weights once whatever its rows:
# on a 2-core AMX Xeon (bf16, 2026-11-30), where a decode step of 64 sequences takes ~72 ms and
# one of 16 ~25 ms, the ``throughput`` workload ran at 333/435/569 output tok/s with 512-token
# steps, 347/509/625 with 1024 and 510/586/634 with 2048 (three alternating rounds on a noisy
# machine); 2048 and 4096 were level (651 / 652). Sessions 11-12 used 512 on CPUs: on a 2-core
# AVX2 VM in float32, where a step's GEMMs are compute-bound, bigger steps bought nothing
# (86-95 tok/s either way) and the ``online`` TTFT p99 at 0.5 req/s was 3267 ms with 2048
# against 2662 with 512 (p50 944 / 955, TPOT p50 123 / 147 ms).
DEFAULT_TOKEN_BUDGET = 2048


class LLMEngine:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        config.validate()
        self.config = config
        model_dir = resolve_model_dir(config.model)
        self.model_config = mc = read_config(model_dir)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":  # a cold start compiles the kernels while the weights load
            native.start_build()
        self.dtype = resolve_dtype(config.dtype, mc.torch_dtype, self.device)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                f"({mc.max_position_embeddings}); lower max_model_len"
            )
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(
            DEFAULT_TOKEN_BUDGET, config.max_num_seqs
        )

        from transformers import AutoTokenizer  # the tokenizer and chat templates come from transformers

        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        self.eos_token_ids = self._eos_token_ids(model_dir)

        self.runner = ModelRunner(
            model_dir,
            mc,
            self.dtype,
            self.device,
            self.max_model_len,
            config.block_size,
            config.quantization,
            config.kv_cache_dtype,
        )
        self.num_kv_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(self.num_kv_blocks)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            self.max_num_batched_tokens,
            make_policy(config.scheduling_policy, config.user_weights),
            self.eos_token_ids,
            self.max_model_len,
        )
        self.sampler = Sampler(mc.vocab_size, self.eos_token_ids, self.device, config.seed)

        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._auto_ids = itertools.count()
        self._closed = False
        self._counters = dict.fromkeys(
            ("prompt_tokens", "generated_tokens", "computed_tokens", "num_steps", "num_requests"), 0
        )
        self.latency = latency_histograms()  # time to first token, per output token, end to end
        self.processor = OutputProcessor(self.tokenizer, self.scheduler.finish, self.latency)
        self.users: dict[str, UserStats] = {}  # by user; idle users are dropped (user_idle_seconds)
        self._peak_blocks = 0
        self._waste_at_peak = 0.0
        self._slot_steps = 0
        self._empty_slot_steps = 0
        self.startup_seconds = time.perf_counter() - t0
        logger.info(
            "pagedq engine: %s (%s) on %s in %s, %d KV blocks of %d tokens, ready in %.1fs",
            model_dir,
            mc.architecture,
            self.device,
            self.dtype,
            self.num_kv_blocks,
            config.block_size,
            self.startup_seconds,
        )

    # --- set-up ----------------------------------------------------------------------------

    def _eos_token_ids(self, model_dir: str) -> list[int]:
        ids = list(self.model_config.eos_token_ids)
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    def _num_kv_blocks(self) -> int:
        cfg, block_bytes = self.config, self.runner.block_bytes()
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory is not None:
            n = int(cfg.kv_cache_memory) // block_bytes
            if n < 1:
                raise ValueError(
                    f"kv_cache_memory={cfg.kv_cache_memory} bytes is smaller than one KV block ({block_bytes} bytes "
                    f"for block_size={cfg.block_size}); raise kv_cache_memory"
                )
            return n
        wanted = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * _DEFAULT_GPU_KV_SHARE)
        else:
            budget = min(int(_available_memory() * _DEFAULT_CPU_KV_SHARE), _DEFAULT_CPU_KV_CAP)
        return max(1, min(wanted, budget // block_bytes))

    # --- requests --------------------------------------------------------------------------

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            limit = self.max_model_len * _CHARS_PER_TOKEN_BOUND
            if len(prompt) > limit:
                # tokenizing megabytes takes seconds of CPU: a prefix that already holds more tokens
                # than the model takes settles it (a cut can add at most one token)
                head = len(self.tokenizer.encode(prompt[:limit]))
                if head - 1 >= self.max_model_len:
                    raise ValueError(
                        f"prompt has more than {head - 1} tokens ({len(prompt)} characters), but max_model_len "
                        f"is {self.max_model_len}; shorten the prompt or raise max_model_len"
                    )
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict):
            unknown = sorted(str(k) for k in prompt if k not in ("prompt", "prompt_token_ids"))
            if unknown:
                raise ValueError(
                    f"a prompt dict takes 'prompt_token_ids' (and optionally 'prompt', its text) or 'prompt', "
                    f"got unknown keys {unknown}"
                )
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                if text is not None:
                    check_text("prompt", text)
                return text, check_token_ids("prompt_token_ids", prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt_token_ids' or 'prompt', got neither")
        if isinstance(prompt, (list, tuple)):
            return None, check_token_ids("prompt", prompt)
        raise ValueError(
            f"a prompt must be a string, a list of token ids or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
        )

    def validate_request(self, prompt: PromptType, params: ParamsType | None) -> tuple[str | None, list[int]]:
        """Check one request without queueing it; return its prompt text and token ids.

        Raises ``ValueError`` naming the field, the value and what is allowed.
        """
        self._check_open()
        params = SamplingParams() if params is None else params
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise ValueError(
                f"params must be a SamplingParams or a BeamSearchParams, got {type(params).__name__}"
            )
        params.validate()
        params.check_vocab(self.model_config.vocab_size)
        if params.n > self.config.max_num_seqs and not isinstance(params, BeamSearchParams):
            raise ValueError(
                f"n must be <= max_num_seqs ({self.config.max_num_seqs}): a request's samples run together, "
                f"got {params.n}"
            )
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("prompt is empty (0 tokens); pass at least one token")
        bad = [t for t in ids if t >= self.model_config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt has token ids outside the vocabulary (size {self.model_config.vocab_size}): {bad[:5]}"
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len} (prompt plus at least one "
                "generated token must fit); shorten the prompt or raise max_model_len"
            )
        longest = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        need = self.block_manager.blocks_needed(longest)
        what = f"up to {need} KV blocks ({longest} tokens)"
        if isinstance(params, BeamSearchParams):
            if params.beam_width > self.config.max_num_seqs:
                raise ValueError(
                    f"beam_width={params.beam_width} exceeds max_num_seqs={self.config.max_num_seqs}; "
                    "lower beam_width or raise max_num_seqs"
                )
            # the beams share the prompt's full blocks (when sharing is on) and hold the rest each
            shared = len(ids) // self.config.block_size if self.config.enable_kv_sharing else 0
            need = shared + params.beam_width * (need - shared)
            what = f"up to {need} KV blocks ({params.beam_width} beams of up to {longest} tokens)"
        if need > self.num_kv_blocks:
            raise ValueError(
                f"request needs {what} but the whole pool has {self.num_kv_blocks}; "
                "lower max_tokens or give the engine more KV memory (num_kv_blocks / kv_cache_memory)"
            )
        return text, ids

    def add_request(
        self,
        prompt: PromptType,
        params: ParamsType | None = None,
        request_id: str | None = None,
        user: str | None = None,
    ) -> str:
        """Validate and queue one request; return its id. Raises ``ValueError`` on bad input.

        ``params`` is a :class:`SamplingParams` or, for beam search, a :class:`BeamSearchParams`.
        ``user`` names who asked (fair sharing between users; ``"default"`` when None).
        """
        params = SamplingParams() if params is None else params
        if user is not None:
            check_text("user", user, allow_empty=False)
        if request_id is not None:
            check_text("request_id", request_id, allow_empty=False)
        text, ids = self.validate_request(prompt, params)
        if request_id is None:
            request_id = str(next(self._auto_ids))
            while request_id in self.requests:
                request_id = str(next(self._auto_ids))
        elif request_id in self.requests:
            raise ValueError(
                f"request_id {request_id!r} is already in use; pick another or wait until it finishes"
            )
        req = Request(
            request_id,
            text,
            ids,
            params,
            next(self._arrivals),
            user=user or "default",
            arrival_time=time.perf_counter(),
        )
        if isinstance(params, BeamSearchParams):
            BeamSearch.start(req, self.eos_token_ids, self.max_model_len)
            self._counters["prompt_tokens"] += len(ids)
            self._user(req.user).prompt_tokens += len(ids)
        else:
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None]
            for i in range(params.n):
                seq = Sequence(req, i)
                detokenizer.start(seq)
                if params.seed is not None:
                    seq.generator = torch.Generator(device=self.device)
                    seq.generator.manual_seed(params.seed + i)
                req.seqs.append(seq)
            self._counters["prompt_tokens"] += len(ids) * params.n
            self._user(req.user).prompt_tokens += len(ids) * params.n
        # n > 1: the prompt is prefilled once, by sample 0; the others fork from it (sharing its
        # blocks) when its prefill completes, and sample their first token from the same logits
        self.scheduler.add(req.seqs[0])
        self.requests[request_id] = req
        self._counters["num_requests"] += 1
        self._user(req.user).requests += 1
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its blocks; returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        return self.processor.output(req)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an explicit error (``finish_reason="error"``) and free its
        blocks; returns their final outputs. For a failure the engine cannot pin on a request."""
        outputs = []
        for rid, req in list(self.requests.items()):
            self._fail(req, message)
            outputs.append(self.processor.output(req))
            del self.requests[rid]
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of the requests that changed in it.

        schedule → execute (the model over the packed batch) → sample → update (the scheduler
        commits the step) → outputs. If the model step raises, the step is not lost for
        everyone: the engine runs it again without the requests admitted in it, then tries
        those (or, if that fails too, every request) one by one; the requests that fail alone
        end with ``finish_reason="error"`` and ``RequestOutput.error``, their blocks are freed,
        and the others go on as if nothing had happened (their K/V slots are simply written
        again). A failure while sampling or processing a token fails only its own request.
        """
        self._check_open()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError(
                    f"the scheduler could not run any of {len(self.scheduler.running)} running and "
                    f"{len(self.scheduler.waiting)} waiting sequences (a bug in pagedq; please report it)"
                )
            return []
        touched = {item.seq.request.request_id: item.seq.request for item in sched.scheduled}
        plan, logits = self._execute(sched)
        if plan is not None and logits is not None:
            self._account(plan)
            sampled = self._sample_step(plan, logits)
            self.scheduler.update_from_output(plan.step, [(seq, token) for seq, token, _ in sampled])
            for seq, _, lp in sampled:
                self._guarded(seq.request, self.processor.process_token, seq, lp)
        outputs, now = [], time.perf_counter()
        for req in touched.values():
            out = self.processor.output(req)
            outputs.append(out)
            self.processor.observe_latency(req, out, now)
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    # --- execute -----------------------------------------------------------------------------

    def _plan(self, step: SchedulerOutput) -> _StepPlan:
        """Which rows of the packed batch are sampled and which score prompt tokens (no state
        changes: a failed step can be planned again)."""
        plan = _StepPlan(step)
        start = 0
        for item in step.scheduled:
            seq, n = item.seq, item.num_new_tokens
            if item.samples:
                plan.sample_rows.append(start + n - 1)
                plan.samplers.append(seq)
            req = seq.request
            if req.prompt_logprobs is not None and seq.index == 0:
                # position p predicts prompt token p + 1; score each prompt position once
                first = max(item.start, req.num_prompt_logprobs_done)
                last = min(item.start + n, seq.num_prompt_tokens - 1)
                for p in range(first, last):
                    plan.prompt_rows.append(start + p - item.start)
                    plan.prompt_targets.append((req, seq.token_ids[p + 1]))
                plan.prompt_done[req.request_id] = max(req.num_prompt_logprobs_done, last)
            start += n
        plan.num_tokens = start
        return plan

    def _execute(self, step: SchedulerOutput) -> tuple[_StepPlan | None, torch.Tensor | None]:
        try:
            plan = self._plan(step)
            return plan, self.runner.execute(step, plan.rows)
        except Exception as e:  # any failure of the model step is isolated
            return self._isolate_fault(step, e)

    def _isolate_fault(
        self, step: SchedulerOutput, error: Exception
    ) -> tuple[_StepPlan | None, torch.Tensor | None]:
        """Find the requests that make the model step fail and fail them; return the plan and
        logits of the rest (None if nothing is left)."""
        groups: dict[str, list[ScheduledSeq]] = {}
        for item in step.scheduled:
            groups.setdefault(item.seq.request.request_id, []).append(item)
        logger.warning(
            "an engine step over %d requests failed (%s: %s); finding the requests responsible",
            len(groups),
            type(error).__name__,
            error,
        )

        def attempt(rids: list[str]) -> tuple[list[str], _StepPlan, torch.Tensor]:
            keep = set(rids)
            sub = step.subset([it for it in step.scheduled if it.seq.request.request_id in keep])
            plan = self._plan(sub)
            return rids, plan, self.runner.execute(sub, plan.rows)

        good: list[str] = []
        last = None  # the latest attempt that succeeded
        suspects = [rid for rid, items in groups.items() if any(it.admitted for it in items)]
        to_test = list(groups)
        if suspects and len(suspects) < len(groups):
            rest = [rid for rid in groups if rid not in suspects]
            try:
                last = attempt(rest)
                good, to_test = rest, suspects
            except Exception:  # the fault is not (only) in the new requests
                pass
        for rid in to_test:
            try:
                last = attempt([rid])
                good.append(rid)
            except Exception as e:
                self._fail_with(groups[rid][0].seq.request, e, "the model step")
        if not good:
            return None, None
        if last is not None and set(last[0]) == set(good):
            return last[1], last[2]
        _, plan, logits = attempt(good)
        return plan, logits

    def _fail(self, req: Request, message: str) -> None:
        """End ``req`` with an explicit error: its sequences finish with ``"error"`` and free
        their blocks."""
        if req.error is None:
            req.error = message
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "error"

    def _guarded(self, req: Request, fn, *args) -> bool:
        """Run one request's part of the step; if it raises, fail that request only."""
        if req.error is not None:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:  # one request's failure must not stop the others
            self._fail_with(req, e, getattr(fn, "__name__", "the step"))
            return False

    def _fail_with(self, req: Request, error: Exception, where: str) -> None:
        logger.error("request %s failed in %s", req.request_id, where, exc_info=error)
        self._fail(req, f"the engine failed on this request: {type(error).__name__}: {error}")

    def _account(self, plan: _StepPlan) -> None:
        """Counters of a step that ran: computed tokens (engine and per user), steps, KV peak."""
        for rid, done in plan.prompt_done.items():
            self.requests[rid].num_prompt_logprobs_done = done
        self._counters["computed_tokens"] += plan.num_tokens
        now = time.monotonic()
        for item in plan.step.scheduled:
            stats = self._user(item.seq.request.user)
            stats.computed_tokens += item.num_new_tokens
            stats.last_active = now
        if self._counters["num_steps"] % 512 == 0:
            self.prune_idle_users()
        self._counters["num_steps"] += 1
        # KV occupancy peaks here: this step's blocks are allocated and written, and nothing
        # finished or pruned in it has been freed yet
        self._update_kv_stats()

    # --- sample ------------------------------------------------------------------------------

    def _sample_step(self, plan: _StepPlan, logits: torch.Tensor) -> list[tuple[Sequence, int, object]]:
        """Read the step's logits: prompt log-probabilities, beam-search rows (advancing every
        search whose beams all have theirs), and a sampled token for every other sequence whose
        chunk reached its end — and for the samples of ``n > 1`` requests whose prompt just
        finished, forked from sample 0 and drawn from its row. Returns (sequence, token,
        log-probabilities) for the scheduler to append."""
        if plan.prompt_rows:
            try:
                self.processor.record_prompt_logprobs(logits[len(plan.sample_rows) :], plan.prompt_targets)
            except Exception as e:
                for req in {r.request_id: r for r, _ in plan.prompt_targets}.values():
                    self._fail_with(req, e, "prompt logprobs")
        samplers = plan.samplers
        if not samplers:
            return []
        sample_logits = logits[: len(plan.sample_rows)]
        beams = [i for i, seq in enumerate(samplers) if seq.request.beam is not None]
        if beams:
            picked = sample_logits.index_select(0, torch.tensor(beams, device=logits.device))
            self._advance_beams(picked, [samplers[i] for i in beams])
            keep = [i for i, seq in enumerate(samplers) if seq.request.beam is None]
            if not keep:
                return []
            sample_logits = sample_logits.index_select(0, torch.tensor(keep, device=logits.device))
            samplers = [samplers[i] for i in keep]
        forked = self._fork_siblings(samplers)
        if forked:
            rows = torch.tensor([row for _, row in forked], device=logits.device)
            sample_logits = torch.cat([sample_logits, sample_logits.index_select(0, rows)])
            samplers = samplers + [sib for sib, _ in forked]
        # a request that failed in this step (prompt logprobs, a fork) gets no token
        sampled = [x for x in self._sample(sample_logits, samplers) if x[0].request.error is None]
        for seq, _, _ in sampled:
            self._counters["generated_tokens"] += 1
            self._user(seq.request.user).generated_tokens += 1
        return sampled

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[Sequence, int, object]]:
        """Sample every row at once; if that raises, sample row by row (seeded generators put
        back first) and fail the requests whose rows raise."""
        states = [(s, s.generator.get_state()) for s in seqs if s.generator is not None]
        try:
            out = self.sampler(logits, seqs)
            return list(zip(seqs, out.token_ids, out.logprobs))
        except Exception as e:
            logger.warning(
                "sampling %d rows failed (%s: %s); sampling them one by one", len(seqs), type(e).__name__, e
            )
        for s, state in states:
            cast(torch.Generator, s.generator).set_state(state)
        picked = []
        for i, seq in enumerate(seqs):
            if seq.request.error is not None:
                continue
            try:
                one = self.sampler(logits[i : i + 1], [seq])
            except Exception as e:
                self._fail_with(seq.request, e, "sampling")
                continue
            picked.append((seq, one.token_ids[0], one.logprobs[0]))
        return [(seq, t, lp) for seq, t, lp in picked if seq.request.error is None]

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        self.scheduler.fork(parent, child, self.config.enable_kv_sharing)

    def _advance_beams(self, logits: torch.Tensor, beams: list[Sequence]) -> None:
        """Give each beam its next-token log-probabilities (rows of ``logits``, in order of
        ``beams``); advance every search whose live beams all have theirs."""
        rows = torch.log_softmax(logits.float(), dim=-1)
        reqs: dict[str, Request] = {}
        for seq, row in zip(beams, rows):
            seq.request.beam.collect(seq, row)
            reqs[seq.request.request_id] = seq.request
        for req in reqs.values():
            if req.error is None and req.beam.ready():
                self._guarded(req, self._beam_step, req)

    def _beam_step(self, req: Request) -> None:
        n = req.beam.advance(req, self._fork, self.scheduler.finish)
        self._counters["generated_tokens"] += n
        self._user(req.user).generated_tokens += n

    def _fork_siblings(self, samplers: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Fork the waiting samples of every request whose sample 0 just finished its prefill.

        Returns (sibling, row of the parent in ``samplers``) for each new running sibling.
        """
        forked = []
        for row, seq in enumerate(samplers):
            req = seq.request
            if seq.index != 0 or len(req.seqs) == 1 or seq.num_output_tokens:
                continue
            for sib in req.seqs[1:]:
                if (
                    sib.block_table
                    or sib.is_finished
                    or sib.num_output_tokens
                    or sib in self.scheduler.waiting
                ):
                    continue  # already forked
                if not self._guarded(req, self._fork, seq, sib):
                    break
                if sib.status is SequenceStatus.RUNNING:
                    forked.append((sib, row))
        return forked

    # --- streaming ---------------------------------------------------------------------------

    def stream(
        self, prompts: Iterable[PromptType], params: ParamsType | list[ParamsType] | None = None
    ) -> Iterator[RequestOutput]:
        """Add ``prompts`` and yield their outputs step by step (cumulative text, ``finished`` at the end).

        Closing the iterator early (``break``) aborts the requests it added and frees their blocks.
        """
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        pending = set(ids)
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        if out.raise_if_failed().finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.abort(rid)

    # --- stats and lifecycle ----------------------------------------------------------------------

    def _update_kv_stats(self) -> None:
        used = self.block_manager.num_used_blocks
        slots, tokens = self.block_manager.num_allocated_slots_and_tokens()
        self._slot_steps += slots
        self._empty_slot_steps += slots - tokens
        if used > self._peak_blocks:
            self._peak_blocks = used
            self._waste_at_peak = (slots - tokens) / slots if slots else 0.0

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache when no request holds blocks; False (nothing done) otherwise."""
        return self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        """Counters and gauges of the KV pool and of the work done since start-up.

        ``kv_waste`` is the share of allocated slots that hold no token right now;
        ``peak_kv_waste`` is that share at the step when blocks in use peaked (the memory that
        bounds the batch); ``avg_kv_waste`` weighs every step by its allocated slots.
        """
        slots, tokens = self.block_manager.num_allocated_slots_and_tokens()
        return {
            "num_kv_blocks": self.num_kv_blocks,
            "block_size": self.config.block_size,
            "kv_blocks_in_use": self.block_manager.num_used_blocks,
            "peak_kv_blocks_in_use": self._peak_blocks,
            "kv_waste": (slots - tokens) / slots if slots else 0.0,
            "peak_kv_waste": self._waste_at_peak,
            "avg_kv_waste": self._empty_slot_steps / self._slot_steps if self._slot_steps else 0.0,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.block_manager.prefix_cache_queries,
            "prefix_cache_hits": self.block_manager.prefix_cache_hits,
            "prefix_cached_blocks": self.block_manager.num_cached_blocks,
            "prefix_cache_evictions": self.block_manager.num_evictions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            **self._counters,
            "kv_cache_bytes": self.num_kv_blocks * self.runner.block_bytes(),
            "weight_bytes": self.runner.weight_bytes,
            "startup_seconds": self.startup_seconds,
        }

    def _user(self, user: str) -> UserStats:
        stats = self.users.get(user)
        if stats is None:
            stats = self.users[user] = UserStats(last_active=time.monotonic())
        return stats

    def prune_idle_users(self) -> list[str]:
        """Drop users with nothing in the engine and no activity for ``user_idle_seconds`` from the
        per-user stats and the scheduling policy (so both tables stay as small as the set of
        recent users); returns who was dropped. A user who comes back starts afresh: fair share
        would start them at the least virtual time among active users anyway."""
        cutoff = time.monotonic() - self.config.user_idle_seconds
        busy = {req.user for req in self.requests.values()}
        idle = [u for u, st in self.users.items() if u not in busy and st.last_active < cutoff]
        for user in idle:
            del self.users[user]
            self.scheduler.policy.forget(user)
        return idle

    def user_stats(self) -> dict[str, UserStats]:
        """What each recently active user was served: requests, prompt, computed and generated
        tokens (the real counts; fair share's catch-up is not in them)."""
        self.prune_idle_users()
        return {u: dataclasses.replace(st) for u, st in self.users.items()}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed; create a new LLM")

    def close(self) -> None:
        """Abort what is running and free the weights, the KV cache and every buffer."""
        if self._closed:
            return
        for rid in list(self.requests):
            self.abort(rid)
        self.runner.release()
        self._closed = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
