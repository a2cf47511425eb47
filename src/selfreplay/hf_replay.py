"""Self-generated replay for Hugging Face models: the frozen teacher samples the replay sequences itself.

As in the paper (§3.2, §5.9), every sequence is prompted with BOS only — no chat template, also for instruct
models — sampled at temperature 1 to a fixed length with EOS ignored. A second prompt mode (``chat``) starts from
the chat template's prefix up to where a user turn would begin and lets the model write the whole exchange.
Refills, seeding and the reuse of the teacher's log-probs as KL targets follow
:class:`selfreplay.replay.SelfGeneratedReplay`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch

from selfreplay.errors import SelfReplayError
from selfreplay.hf_model import Teacher, lm_logits
from selfreplay.replay import ReplayBatch, StreamPosition
from selfreplay.sampling import check_sampling_args, choose_tokens, make_generator

log = logging.getLogger(__name__)

PROMPT_MODES = ("bos", "chat")
_SENTINELS = ("\u2063USER\u2063", "\u2063REPLY\u2063", "\u2063NEXT\u2063")  # text no real conversation contains


@torch.no_grad()
def sample_hf(model, prompt_ids: torch.Tensor, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
              top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
              return_logprobs: bool = False, logprobs_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sample every row of ``prompt_ids`` [B, P] on to exactly ``length`` tokens with the model's KV cache.

    EOS is not special: rows always run to ``length`` (the paper's fixed-length samples). Returns the tokens
    [B, length] (prompt included) and, with ``return_logprobs``, the model's temperature-1 log-probs
    [B, length, V] at every position (row t: the distribution of token t+1; the last row costs one more step)
    — the KL targets, equal to a teacher forward pass over the tokens.
    """
    B, P = prompt_ids.shape
    if not 1 <= P < length:
        raise SelfReplayError(f"replay length={length}: must exceed the prompt length {P}")
    check_sampling_args(temperature, top_k, top_p)
    tokens = torch.empty(B, length, dtype=torch.long, device=prompt_ids.device)
    tokens[:, :P] = prompt_ids
    logprobs = None
    out = lm_logits(model, prompt_ids, use_cache=True)
    step_logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, P, V]
    if return_logprobs:
        logprobs = torch.empty(B, length, step_logp.shape[-1], dtype=logprobs_dtype, device=prompt_ids.device)
        logprobs[:, :P] = step_logp
    cache = out.past_key_values
    for t in range(P, length):
        nxt = choose_tokens(step_logp[:, -1], temperature, top_k, top_p, generator)
        tokens[:, t] = nxt
        if t == length - 1 and not return_logprobs:
            break
        out = lm_logits(model, nxt[:, None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        step_logp = torch.log_softmax(out.logits.float(), dim=-1)
        if return_logprobs:
            logprobs[:, t] = step_logp[:, -1]
    return tokens, logprobs


def start_token_id(tokenizer) -> int:
    """The BOS token id, or EOS when the tokenizer has no BOS (e.g. Qwen), which then starts documents too."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise SelfReplayError("replay.prompt=bos: the tokenizer has neither a BOS nor an EOS token to start from")


def chat_prefix(tokenizer) -> str:
    """The chat template's text before the first user turn begins (system preamble, BOS, ...).

    Renders [user: S1] and cuts before the user turn's header, which is found as the part between an assistant
    turn's end and the next user message in [user: S1, assistant: S2, user: S3]. If that cannot be worked out,
    the whole text before S1 (user header included) is the prefix.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SelfReplayError("replay.prompt=chat: the tokenizer has no chat template; use replay.prompt=bos")
    s1, s2, s3 = _SENTINELS

    def render(turns: list[tuple[str, str]]) -> str:
        messages = [{"role": role, "content": text} for role, text in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False)

    one = render([("user", s1)])
    three = render([("user", s1), ("assistant", s2), ("user", s3)])
    two = render([("user", s1), ("assistant", s2)])
    if s1 not in one:
        raise SelfReplayError("replay.prompt=chat: the chat template does not render the user message")
    before_user = one[: one.index(s1)]
    try:
        assistant_end = two[two.index(s2) + len(s2):]
        between = three[three.index(s2) + len(s2): three.index(s3)]
    except ValueError:
        return before_user
    if not between.startswith(assistant_end.rstrip("\n")) and assistant_end:
        return before_user
    user_header = between[len(assistant_end):] if between.startswith(assistant_end) else between[
        len(assistant_end.rstrip("\n")):]
    if user_header and before_user.endswith(user_header):
        return before_user[: len(before_user) - len(user_header)]
    return before_user


def prompt_ids_for(tokenizer, mode: str) -> list[int]:
    """Token ids every replay row starts with: [BOS] (``bos``) or the chat template's prefix (``chat``)."""
    if mode == "bos":
        return [start_token_id(tokenizer)]
    if mode == "chat":
        ids = tokenizer(chat_prefix(tokenizer), add_special_tokens=False)["input_ids"]
        return list(ids) if ids else [start_token_id(tokenizer)]
    raise SelfReplayError(f"replay.prompt={mode!r}: expected one of {', '.join(PROMPT_MODES)}")


class HFSelfReplay(StreamPosition):
    """A :class:`selfreplay.replay.ReplaySource` sampling replay from a Hugging Face :class:`Teacher`.

    Every refill samples ``buffer × batch_size`` rows of exactly ``length`` tokens at once (KV cache), seeded
    from (seed, refill index), so the stream is reproducible and resuming only needs the batch count. Prompt
    positions carry loss_mask 0. The teacher's log-probs from sampling are kept as KL targets when one buffer's
    worth fits in ``max_logprobs_bytes`` (``keep_logprobs="auto"``; ``"always"`` / ``"never"`` force it);
    otherwise batches carry none and the trainer recomputes the teacher chunk by chunk.
    """

    def __init__(self, teacher: Teacher, tokenizer, batch_size: int, length: int, buffer: int = 16,
                 prompt: str = "bos", temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0, keep_logprobs: str = "auto",
                 max_logprobs_bytes: int = 1 << 30, autocast_dtype: Optional[torch.dtype] = None,
                 logprobs_dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise SelfReplayError(f"replay batch_size={batch_size}: must be positive")
        if buffer < 1:
            raise SelfReplayError(f"replay.buffer={buffer}: must be positive")
        if temperature <= 0:
            raise SelfReplayError(f"replay.temperature={temperature}: must be positive")
        check_sampling_args(temperature, top_k, top_p)
        if keep_logprobs not in ("auto", "always", "never"):
            raise SelfReplayError(f"keep_logprobs={keep_logprobs!r}: expected auto, always or never")
        if seed < 0:
            raise SelfReplayError(f"replay seed={seed}: must be >= 0")
        self.teacher, self.batch_size, self.length, self.buffer = teacher, batch_size, length, buffer
        self.prompt, self.temperature, self.top_k, self.top_p, self.seed = prompt, temperature, top_k, top_p, seed
        self.autocast_dtype, self.logprobs_dtype = autocast_dtype, logprobs_dtype
        self.prompt_ids = prompt_ids_for(tokenizer, prompt)
        if len(self.prompt_ids) >= length:
            raise SelfReplayError(f"replay.length={length}: the {prompt} prompt alone has {len(self.prompt_ids)} "
                                  f"tokens; use a longer replay.length")
        vocab = _vocab_size(teacher)
        need = buffer * batch_size * length * vocab * logprobs_dtype.itemsize
        self.keeps_logprobs = keep_logprobs == "always" or (keep_logprobs == "auto" and need <= max_logprobs_bytes)
        if keep_logprobs == "auto" and not self.keeps_logprobs:
            log.info("replay: one buffer of teacher log-probs would take %.2f GiB (> %.2f GiB); the trainer "
                     "recomputes the teacher instead", need / 2 ** 30, max_logprobs_bytes / 2 ** 30)
        self.sample_seconds = 0.0
        self.refills = 0
        self._batches = 0
        self._held: Optional[int] = None
        self._tokens: Optional[torch.Tensor] = None
        self._logprobs: Optional[torch.Tensor] = None

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    def sample_refill(self, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Refill ``index`` of the stream: buffer × batch_size rows (timed into ``sample_seconds``)."""
        device = self.teacher.device
        rows = self.buffer * self.batch_size
        prompts = torch.tensor(self.prompt_ids, dtype=torch.long, device=device).expand(rows, -1).contiguous()
        generator = make_generator(self.seed, index, device)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        _sync(device)
        start = time.perf_counter()
        with self.teacher.active(), autocast:
            tokens, logprobs = sample_hf(self.teacher.generate_model, prompts, self.length, self.temperature,
                                         self.top_k, self.top_p, generator, self.keeps_logprobs, self.logprobs_dtype)
        _sync(device)
        self.sample_seconds += time.perf_counter() - start
        self.refills += 1
        return tokens, logprobs

    def loss_mask(self, rows: int) -> Optional[torch.Tensor]:
        """Mask over target tokens: 0 on the prompt (None for the one-token BOS prompt, never a target anyway)."""
        if self.prompt_length == 1:
            return None
        mask = torch.ones(rows, self.length, dtype=torch.float32)
        mask[:, : self.prompt_length] = 0.0
        return mask

    def next_batch(self) -> ReplayBatch:
        refill, slot = divmod(self._batches, self.buffer)
        if self._held != refill:
            self._tokens = self._logprobs = None  # free the old buffer first
            self._tokens, self._logprobs = self.sample_refill(refill)
            self._held = refill
        lo, hi = slot * self.batch_size, (slot + 1) * self.batch_size
        self._batches += 1
        logprobs = None if self._logprobs is None else self._logprobs[lo:hi]
        return ReplayBatch(self._tokens[lo:hi], self.loss_mask(hi - lo), logprobs)

    def _identity(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "buffer": self.buffer, "length": self.length,
                "prompt": self.prompt, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def _drop_buffer(self) -> None:
        self._held = self._tokens = self._logprobs = None


def _vocab_size(teacher: Teacher) -> int:
    from selfreplay.hf_model import base_causal_lm

    head = base_causal_lm(teacher.module).get_output_embeddings()
    return int(head.weight.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

