"""The engine loop: requests in, one scheduled forward pass per `step()`, outputs out.

Owns the request table. Validation happens before a request touches any engine state, so a
bad request raises a clear `ValueError` and the others keep running.

Overlap scheduling (`EngineConfig.async_scheduling`, as SGLang's overlap scheduler and vLLM's
async scheduling): `step()` schedules and launches step N+1 first, then reads step N's sampled
tokens (waiting for the GPU only there) and does the per-token bookkeeping while step N+1 runs.
A sequence that sampled in step N is scheduled in N+1 with a placeholder as its last token; the
runner fills it on the device from step N's token tensor. A sequence that turns out to have
finished at step N (EOS, stop string) wastes its slot in N+1; its result there is dropped. Steps
that need the known tokens on the host first (penalties, min_tokens, logprobs, KV export,
expert-parallel groups) run without overlap: the step in flight is finished before scheduling.
A step with grammar-constrained rows (`engine/structured.py`) keeps the overlap of its forward
pass: it reads the step in flight after launching its forward and before its sampling, since
the grammar's mask for the next token depends on the previous one.

Disaggregation goes through the `KVConnector` handed to the constructor (`engine.kv_connector`):
sequences whose KV is loaded from another worker wait off the batch; a sequence whose KV is
saved to another worker streams it layer by layer during the forward pass that completes its
prompt, stops after its first token and holds its blocks until the save is done.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.host_tier import make_host_tier
from tandem.engine.kv_connector import KVConnector
from tandem.engine.model_runner import ModelRunner, load_hf_config
from tandem.engine.outputs import CompletionOutput, RequestOutput
from tandem.protocol.kv_events import KVEvent
from tandem.protocol.worker import Continuation, EngineStats
from tandem.engine.sampler import Sampler
from tandem.protocol.sampling_params import SamplingParams
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence
from tandem.engine.structured import GrammarCompiler, StructuredOutputs

PromptType = Union[str, dict, list]


@dataclass(frozen=True)
class ValidatedPrompt:
    """A request `LLMEngine.validate` accepted: the prompt's text (if given as text), its token
    ids and the sampling params; with structured output, its compiled grammar; for a
    continuation, the last `continuation.num_output_tokens` of `token_ids` are its earlier output
    (`prompt_token_ids` is the prompt without them)."""
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    grammar: object | None = None  # xgrammar.CompiledGrammar of params.structured_output
    continuation: Continuation | None = None

    @property
    def num_resumed_tokens(self) -> int:
        return self.continuation.num_output_tokens if self.continuation is not None else 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: len(self.token_ids) - self.num_resumed_tokens]


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    sent_tokens: list[int] = field(default_factory=list)  # per output: tokens already reported
    stream: bool = True  # False: one output, when finished (offline use; saves per-step work)


@dataclass
class _LaunchedStep:
    """A step whose forward pass and sampling are queued on the device, tokens not read yet."""
    sampling: list[Sequence]  # row i of `tokens` is sampling[i]'s next token
    tokens: torch.Tensor  # [len(sampling)] int64, on the device
    host_tokens: torch.Tensor | None  # pinned copy of `tokens`, valid once `copied` has run
    copied: object | None  # CUDA event after the copy (None on CPU: already there)
    raw_logprobs: torch.Tensor | None  # [len(sampling), vocab] when a row asked for logprobs
    saving: frozenset[str] = frozenset()  # seq_keys whose KV the connector saved in this step

    def token_list(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()  # the only wait for the GPU in a step
        return (self.host_tokens if self.host_tokens is not None else self.tokens).tolist()


def _keys(seqs: list[Sequence]) -> frozenset[str]:
    return frozenset(seq.seq_key for seq in seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, weights=None, runner_factory: Callable[..., ModelRunner] | None = None,
                 kv_connector: KVConnector | None = None) -> None:
        """`runner_factory(config, hf_config, weights)` builds the model runner (default
        `ModelRunner`); an expert-parallel rank passes one bound to its group. `kv_connector`:
        where KV computed elsewhere comes from and goes to (none: colocated)."""
        from transformers import AutoTokenizer

        torch.manual_seed(config.seed)
        self.config = config
        self.hf_config = load_hf_config(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.runner = (runner_factory or ModelRunner)(config, self.hf_config, weights)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_connector = kv_connector or KVConnector()
        self._transfer_wakeup = threading.Event()  # set by the connector when a transfer resolves
        self.kv_connector.bind(self.runner.kv_cache, config.block_size, self._transfer_wakeup,
                               kv_scales=self.runner.kv_scales.flat() if self.runner.kv_scales else [])
        if kv_connector is not None and getattr(self.runner, "tensor_parallel_size", 1) > 1:
            kv_connector.use_tensor_parallel(self.runner)  # a connector that cannot raises
        # Evicted prefix blocks spill to host memory and come back on a hit (None: off).
        self.host_tier = make_host_tier(self.block_manager, self.runner.kv_cache, config.host_kv_cache_gb,
                                        config.max_num_batched_tokens)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy, config.long_prefill_token_threshold, self.kv_connector,
                                   self.host_tier)
        self.eos_token_ids = self._eos_ids()
        self.sampler = Sampler(self.runner.device, self.eos_token_ids)
        self.max_model_len = min(config.max_model_len or self.hf_config.max_position_embeddings,
                                 self.hf_config.max_position_embeddings)
        self.vocab_size = self.hf_config.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)  # any thread
        self.structured = StructuredOutputs(self.runner.device, self.vocab_size)  # engine thread
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._saving: list[Sequence] = []  # prefilled here, blocks held while the connector saves their KV
        # Expert parallelism: the ranks of one group run every forward together (all-to-all in
        # each MoE layer), so each step starts with the runner's `sync_step` and a rank with
        # nothing scheduled runs `execute_idle` while another rank has tokens.
        self.collective = bool(getattr(self.runner, "collective", False))
        self._group_busy = False  # another rank of the group had requests at the last step
        self._in_flight: _LaunchedStep | None = None  # overlap scheduling: launched, not yet read
        self._num_sync_requests = 0  # live requests whose sampling needs known tokens (no overlap)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.hf_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        try:
            from transformers import GenerationConfig

            gen_eos = GenerationConfig.from_pretrained(self.config.model).eos_token_id
            ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        except OSError:
            pass
        return ids

    # ------------------------------------------------------------ validation
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return self.tokenize_prompt(prompt["prompt"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("a prompt must be a string, a list of token ids, or a dict with "
                         "'prompt_token_ids' or 'prompt'")

    def validate(self, prompt: PromptType, params: SamplingParams,
                 continuation: Continuation | None = None) -> ValidatedPrompt:
        """Check a request without touching engine state; raises ValueError with the reason.
        Pure, so callers on other threads validate first and hand the result to `add_validated`
        (an 8k-token prompt's checks cost ~0.5 ms: done once, not again in the engine thread).
        `continuation`: the prompt's last tokens are the request's earlier output (see
        `protocol.worker.Continuation`); the limits below then apply to the original prompt."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is out of the vocabulary [0, {self.vocab_size})")
        resumed = 0
        if continuation is not None:
            resumed = continuation.num_output_tokens
            if params.n != 1:
                raise ValueError("a continuation continues one output: n must be 1")
            if not 0 < resumed < len(ids):
                raise ValueError(f"a continuation's {resumed} earlier output tokens must leave a prompt "
                                 f"(the prompt has {len(ids)} tokens)")
        prompt_len = len(ids) - resumed
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context length is "
                             f"{self.max_model_len}, and at least one token must be generated")
        max_tokens = params.max_tokens or (self.max_model_len - prompt_len)
        if prompt_len + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"length {self.max_model_len}")
        if resumed >= max_tokens:
            raise ValueError(f"a continuation of {resumed} output tokens has nothing left to generate "
                             f"(max_tokens {max_tokens})")
        need = self.block_manager.blocks_needed(prompt_len + max_tokens)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks but the cache has only "
                             f"{self.block_manager.num_blocks}")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError("stop_token_ids contains ids outside the vocabulary")
        grammar = None
        if params.structured_output is not None:  # compiled here, on the caller's thread; cached
            grammar = self.grammars.compile(params.structured_output)
        return ValidatedPrompt(text, ids, params, grammar, continuation)

    # -------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, stream: bool = True,
                    continuation: Continuation | None = None) -> None:
        self.add_validated(request_id, self.validate(prompt, params, continuation), arrival_time, stream)

    def add_validated(self, request_id: str, request: ValidatedPrompt, arrival_time: float | None = None,
                      stream: bool = True) -> None:
        """Admit a request that `validate` (of this engine) accepted."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, params = request.text, request.params
        ids, prompt = request.token_ids, request.prompt_token_ids
        grammar = request.grammar
        if grammar is None and params.structured_output is not None:
            grammar = self.grammars.compile(params.structured_output)
        now = arrival_time if arrival_time is not None else time.monotonic()
        seqs, detoks = [], []
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt))
        for i in range(params.n):
            # A continuation's earlier output is in `token_ids` past the prompt, as a preempted
            # sequence's is: recomputed, counted as output, not reported again.
            seq = Sequence(request_id, prompt, params, arrival_time=now, output_index=i, token_ids=list(ids),
                           max_num_tokens=len(prompt) + max_tokens)
            seqs.append(seq)
            if grammar is not None:
                self.structured.add(seq, grammar)
            detok = IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens,
                                           params.stop_list, params.include_stop_str_in_output)
            if request.continuation is not None and params.detokenize:
                detok.resume(ids[len(prompt):], request.continuation.num_text_chars, params.min_tokens)
            detoks.append(detok)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, text, prompt, params, seqs, detoks,
                                             [request.num_resumed_tokens] * params.n, stream)
        self._num_sync_requests += Sampler.needs_known_tokens(params)
        self.prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final (aborted) output."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if seq in self._saving:  # the save stops before its blocks are freed
                self._saving.remove(seq)
                self.kv_connector.cancel_save(seq)
            if not seq.is_finished:
                self._finish(seq, "abort", None)
        return self._emit(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def must_step(self) -> bool:
        """Whether the caller's loop must call `step()` again: this engine has requests, or (expert
        parallel) a rank of its group had some at the last step. Every rank of a group stops on
        the same step: the first one at which no rank had requests."""
        return bool(self.requests) or self._group_busy

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        touched = self._poll_transfers()
        overlap = self._can_overlap()
        if not overlap:
            self._finish_in_flight(touched)
        sched = self.scheduler.schedule()
        if self.collective:
            self._group_busy, group_tokens = self.runner.sync_step(bool(self.requests), sched.num_tokens)
            if sched.is_empty and group_tokens:
                self.runner.execute_idle()
        if sched.is_empty:
            if self._in_flight is not None:  # its tokens may finish sequences and free blocks
                self._finish_in_flight(touched)
            elif self.host_tier is not None and self.host_tier.busy:
                self.host_tier.wait()  # nothing runs until a host-tier copy lands (it unpins blocks)
            elif self._transfers_pending():
                # Only transfers are in flight: sleep until one resolves instead of spinning.
                self._transfer_wakeup.wait(0.005)
                self._transfer_wakeup.clear()
            elif self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the scheduler cannot admit any waiting request (KV cache too small)")
            return self._outputs(touched)
        launched = self._launch(sched, touched)
        self._finish_in_flight(touched)  # the previous step, read while this one runs
        for item in sched.scheduled:
            # After the previous step's tokens are known: every computed position is resolved.
            self.block_manager.cache_full_blocks(item.seq)
        self._in_flight = launched
        if not overlap:
            self._finish_in_flight(touched)
        return self._outputs(touched)

    def _can_overlap(self) -> bool:
        return (self.config.async_scheduling and not self._num_sync_requests and not self.kv_connector.saves
                and not self.collective)

    def _launch(self, sched, touched: dict[str, _Request]) -> _LaunchedStep:
        """Queue the step's forward pass and sampling on the device; no wait for the GPU, except
        that a step with grammar-constrained rows reads the step in flight between the two."""
        prev = self._in_flight
        connector = self.kv_connector
        saving = [item.seq for item in sched.scheduled if item.samples and connector.wants_save(item.seq)]
        for seq in saving:
            connector.start_save(seq)
        logits = self.runner.execute(sched, prev.tokens if prev is not None else None,
                                     layer_done=connector.layer_computed if saving else None)
        if saving:
            connector.step_computed()
        sampling = [item.seq for item in sched.scheduled if item.samples]
        for item in sched.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        if not sampling:
            return _LaunchedStep([], logits.new_empty(0, dtype=torch.int64), None, None, None, _keys(saving))
        want_logprobs = any(s.sampling_params.logprobs is not None for s in sampling)
        raw = self.sampler.raw_logprobs(logits) if want_logprobs else None
        mask = None
        if self.structured.any_constrained(sampling):
            # The masks need the previous step's tokens: read them now, while the GPU runs this
            # step's forward pass (sequences that stopped there are skipped; their rows dropped).
            self._finish_in_flight(touched)
            result = self.structured.token_mask(sampling)
            for seq in result.rejected:
                self._finish(seq, "abort", None)
                touched[seq.request_id] = self.requests[seq.request_id]
            mask = result.mask
        tokens = self.sampler.sample(logits, sampling, mask)
        host, copied = None, None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        for row, seq in enumerate(sampling):
            seq.add_placeholder(row)
        return _LaunchedStep(sampling, tokens, host, copied, raw, _keys(saving))

    def _finish_in_flight(self, touched: dict[str, _Request]) -> None:
        """Read the launched step's tokens and apply them: stop checks, detokenizing, export."""
        step, self._in_flight = self._in_flight, None
        if step is None or not step.sampling:
            return
        for row, (seq, token) in enumerate(zip(step.sampling, step.token_list())):
            if seq.is_finished:  # finished (or aborted) before this step's token was read
                continue
            req = self.requests[seq.request_id]
            logprobs = None
            if step.raw_logprobs is not None and seq.sampling_params.logprobs is not None:
                logprobs = self.sampler.logprobs(step.raw_logprobs[row], token, seq.sampling_params.logprobs)
            if seq.seq_key in step.saving:
                self._hold_for_save(seq, token, logprobs)
                continue
            self._append_token(req, seq, token, logprobs)
            touched[req.request_id] = req

    def _outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        # Offline (non-streaming) requests report once, when every one of their outputs is done.
        return [self._emit(req) for req in touched.values()
                if req.request_id in self.requests and (req.stream or all(q.is_finished for q in req.seqs))]

    # -------------------------------------------------------- disaggregation
    def _transfers_pending(self) -> bool:
        return bool(self._saving or self.scheduler.waiting_for_kv)

    def _hold_for_save(self, seq: Sequence, token: int, logprobs) -> None:
        """A saved sequence's first token: it leaves the batch, its blocks held until the save is
        done (the connector reads them), and finishes then."""
        seq.add_token(token)
        self.generation_tokens_total += 1
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        self.scheduler.detach(seq)
        self._saving.append(seq)

    def _poll_transfers(self) -> dict[str, _Request]:
        """Finish sequences whose save is done; move sequences whose load resolved into the batch
        (KV arrived: prompt computed, first token appended; failed: the rest of the prompt is
        recomputed here). Returns the requests with news."""
        touched: dict[str, _Request] = {}
        connector = self.kv_connector
        for seq in list(self._saving):
            if connector.save_done(seq):
                self._saving.remove(seq)
                self._finish(seq, "length", None)
                req = self.requests[seq.request_id]
                touched[req.request_id] = req
        if self.scheduler.waiting_for_kv:
            for seq, result in connector.finished_loads():
                if seq.is_finished or seq not in self.scheduler.waiting_for_kv:
                    continue
                req = self.requests[seq.request_id]
                if result.ok:
                    self.scheduler.resume_loaded(seq, seq.num_prompt_tokens)
                    self.block_manager.cache_full_blocks(seq)
                    self._append_token(req, seq, result.first_token, result.logprobs)
                else:
                    self.scheduler.resume_loaded(seq, seq.num_computed_tokens)
                touched[req.request_id] = req
        return touched

    def _append_token(self, req: _Request, seq: Sequence, token: int, logprobs) -> None:
        seq.add_token(token)
        self.generation_tokens_total += 1
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        params = seq.sampling_params
        can_stop = seq.num_output_tokens >= params.min_tokens
        stop_str = req.detoks[seq.output_index].add_token(token, can_stop) if params.detokenize else None
        if can_stop and not params.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop", None)
        elif can_stop and token in params.stop_token_ids:
            self._finish(seq, "stop", token)
        elif can_stop and stop_str is not None:
            self._finish(seq, "stop", stop_str)
        elif seq.num_known_tokens >= seq.max_num_tokens:  # max_tokens reached (<= max_model_len, validated)
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        self.sampler.forget(seq)
        self.structured.forget(seq)

    def _emit(self, req: _Request) -> RequestOutput:
        outputs = []
        for i, (seq, detok) in enumerate(zip(req.seqs, req.detoks)):
            token_ids = seq.output_token_ids
            logprobs = list(seq.output_logprobs) if req.params.logprobs is not None else None
            cumulative = None
            if logprobs is not None:  # a continuation has none for its earlier output: align at the end
                cumulative = sum(lp[t].logprob for lp, t in zip(logprobs, token_ids[len(token_ids) - len(logprobs):]))
            outputs.append(CompletionOutput(
                index=i, text=detok.text, token_ids=token_ids,
                delta_text=detok.take_stream_delta(seq.is_finished),
                delta_token_ids=token_ids[req.sent_tokens[i]:],
                cumulative_logprob=cumulative, logprobs=logprobs,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
            req.sent_tokens[i] = len(token_ids)
        finished = all(seq.is_finished for seq in req.seqs)
        if finished:
            del self.requests[req.request_id]
            self._num_sync_requests -= Sampler.needs_known_tokens(req.params)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens)

    # ------------------------------------------------------------- telemetry
    def drain_cache_events(self) -> list[KVEvent]:
        """Both tiers' events, in the order they happened."""
        return self.block_manager.drain_events()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no sequence (or copy) holds, in both tiers."""
        if self.host_tier is not None:
            self.host_tier.reset()
        self.block_manager.reset_prefix_cache()

    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        return EngineStats(
            num_running=len(sch.running), num_waiting=len(sch.waiting),
            num_running_tokens=sch.num_running_tokens, num_waiting_tokens=sch.num_waiting_tokens,
            num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks, kv_usage=bm.usage,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            num_preemptions=sch.num_preemptions, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            **self._host_tier_stats(),
        )

    def _host_tier_stats(self) -> dict:
        if self.host_tier is None:
            return {}
        host = self.host_tier.snapshot()
        return dict(
            host_kv_total_blocks=host.num_blocks, host_kv_used_blocks=host.num_used_blocks,
            host_kv_usage=host.num_used_blocks / host.num_blocks, host_cache_hits=host.hit_tokens,
            host_bytes_offloaded=host.bytes_offloaded, host_bytes_reloaded=host.bytes_reloaded,
            host_offload_seconds=host.offload_seconds, host_reload_seconds=host.reload_seconds,
            host_offloads_skipped=host.offloads_skipped_busy,
            num_loading_from_host=len(self.scheduler.loading_from_host),
        )
