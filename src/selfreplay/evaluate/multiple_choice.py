"""Multiple-choice benchmark tracking for Hugging Face causal LMs (the paper's MMLU / ARC / CommonsenseQA protocol).

Each question is shown with its choices lettered A., B., ...; the model's answer is the letter with the highest
log-probability as the next token after the prompt. Two prompt styles:
- plain (base models): "Question: ...\\nA. ...\\nB. ...\\nAnswer:" scored on " A", " B", ...;
- chat (``chat=True``, instruct models, paper §5.9): the question wrapped in an instruction asking for
  "ANSWER: $LETTER", rendered with the chat template and its generation prompt, followed by "ANSWER:"; scored on
  " A", " B", ... Since "ANSWER:" is shared by all choices, this ranks choices exactly as scoring the whole
  completion "ANSWER: X" does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from selfreplay.errors import SelfReplayError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHAT_INSTRUCTION = ("Answer the following multiple choice question. The entire content of your response should be "
                    "of the following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of {letters}.")


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int  # index into choices


# --- loading -----------------------------------------------------------------------------------------------------

def load_questions(path: str, split: str = "test") -> list[Question]:
    """Questions from a .jsonl / .json / .parquet file (or anything :func:`hf_data.load_records` reads).

    Accepted record shapes: ``{"question": str, "choices": [str, ...], "answer": index or letter}`` (MMLU-like),
    and ARC / CommonsenseQA style ``{"question": str or {"stem": str, "choices": [{"label", "text"}]},
    "choices": {"label": [...], "text": [...]}, "answerKey": "B"}``.
    """
    from selfreplay.data.text import load_records

    records = load_records(path, split=split)
    return [_question(r, f"questions {path}: record {i}") for i, r in enumerate(records, 1)]


def _question(record: dict, where: str) -> Question:
    question, choices = record.get("question"), record.get("choices")
    if isinstance(question, dict):  # original ARC / CSQA files: {"stem", "choices": [{"label", "text"}]}
        question, choices = question.get("stem"), question.get("choices", choices)
    labels = None
    if isinstance(choices, dict):  # HF ARC / CSQA: {"label": [...], "text": [...]}
        labels, choices = choices.get("label"), choices.get("text")
    elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        labels, choices = [c.get("label") for c in choices], [c.get("text") for c in choices]
    if not isinstance(question, str):
        raise SelfReplayError(f"{where}: expected a string 'question' (or 'question.stem')")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or \
            not all(isinstance(c, str) for c in choices):
        raise SelfReplayError(f"{where}: expected 'choices' to be 2 to {len(LETTERS)} strings (or "
                              f"{{'label': [...], 'text': [...]}})")
    answer = record.get("answer", record.get("answerKey"))
    return Question(question, list(choices), _answer_index(answer, labels, len(choices), where))


def _answer_index(answer, labels: Optional[list], num_choices: int, where: str) -> int:
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and labels is not None and answer.strip() in labels:
        index = labels.index(answer.strip())
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:num_choices]:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    else:
        raise SelfReplayError(f"{where}: expected 'answer' (a choice index or letter) or 'answerKey', got "
                              f"{answer!r}")
    if not 0 <= index < num_choices:
        raise SelfReplayError(f"{where}: answer {answer!r} is out of range for {num_choices} choices")
    return index


# --- prompts -----------------------------------------------------------------------------------------------------

def format_question(q: Question, with_answer: bool = False) -> str:
    """"Question: ...\\nA. ...\\nB. ...\\nAnswer:" (plus " X" when ``with_answer``, for few-shot examples)."""
    lines = [f"Question: {q.question.strip()}"] + [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(q.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}" if with_answer else text


def _plain_prompt(q: Question, shots: Sequence[Question]) -> str:
    return "".join(format_question(s, with_answer=True) + "\n\n" for s in shots) + format_question(q)


def _chat_messages(q: Question, shots: Sequence[Question]) -> list[dict]:
    def body(x: Question) -> str:
        letters = ",".join(LETTERS[:len(x.choices)])
        options = "\n".join(f"{LETTERS[i]}) {c.strip()}" for i, c in enumerate(x.choices))
        return f"{CHAT_INSTRUCTION.format(letters=letters)}\n\n{x.question.strip()}\n\n{options}"

    messages = []
    for s in shots:
        messages += [{"role": "user", "content": body(s)},
                     {"role": "assistant", "content": f"ANSWER: {LETTERS[s.answer]}"}]
    return messages + [{"role": "user", "content": body(q)}]


def prompt_ids(tokenizer, q: Question, shots: Sequence[Question] = (), chat: bool = False) -> list[int]:
    """Token ids of the prompt whose next token is the answer letter."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SelfReplayError("chat-format multiple choice needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(_chat_messages(q, shots), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text + "ANSWER:", add_special_tokens=False)["input_ids"])
    return list(tokenizer(_plain_prompt(q, shots))["input_ids"])


def letter_token_ids(tokenizer, num_choices: int) -> list[int]:
    """The single token " A", " B", ... for each choice; an error if the tokenizer splits one."""
    ids = []
    for letter in LETTERS[:num_choices]:
        pieces = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise SelfReplayError(f"the tokenizer splits ' {letter}' into {len(pieces)} tokens; multiple-choice "
                                  f"scoring needs one token per answer letter")
        ids.append(pieces[0])
    return ids


# --- scoring -----------------------------------------------------------------------------------------------------

def multiple_choice_accuracy(model, tokenizer, questions: Sequence[Question], batch_size: int = 16,
                             device=None, few_shot: int = 0, chat: bool = False) -> dict:
    """Accuracy of argmax over log p(letter | prompt), with the per-question log-probs.

    ``model`` is any Hugging Face causal LM (called with input_ids, attention_mask and position_ids, returning
    ``.logits``). Prompts are batched with left padding; position ids count real tokens only, so padding does
    not change a score. ``few_shot`` k prefixes each question with the k questions after it in the list (cyclically,
    never itself) together with their answers. The model is put in eval mode for the call and restored after.
    Returns {"accuracy", "n", "per_question": [{"logprobs", "predicted", "answer", "correct"}, ...]}.
    """
    if not questions:
        raise SelfReplayError("multiple choice: no questions to score")
    if batch_size < 1:
        raise SelfReplayError(f"multiple choice: batch_size={batch_size}: must be positive")
    if not 0 <= few_shot < len(questions):
        raise SelfReplayError(f"multiple choice: few_shot={few_shot}: expected 0 <= few_shot < {len(questions)} "
                              f"(the number of questions)")
    n = len(questions)
    prompts = [prompt_ids(tokenizer, q, [questions[(i + 1 + j) % n] for j in range(few_shot)], chat)
               for i, q in enumerate(questions)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SelfReplayError("multiple choice: the tokenizer has neither a pad nor an EOS token to pad with")
    if device is None:
        device = next(model.parameters()).device
    letters = {}  # number of choices -> letter token ids

    order = sorted(range(n), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    letter_logprobs: list[Optional[list[float]]] = [None] * n
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = order[start:start + batch_size]
                last_logprobs = _last_token_logprobs(model, [prompts[i] for i in batch], pad_id, device)
                for row, i in enumerate(batch):
                    k = len(questions[i].choices)
                    if k not in letters:
                        letters[k] = letter_token_ids(tokenizer, k)
                    letter_logprobs[i] = last_logprobs[row, letters[k]].tolist()
    finally:
        model.train(was_training)

    per_question = []
    for q, scores in zip(questions, letter_logprobs):
        predicted = max(range(len(scores)), key=scores.__getitem__)
        per_question.append({"logprobs": scores, "predicted": predicted, "answer": q.answer,
                             "correct": predicted == q.answer})
    correct = sum(p["correct"] for p in per_question)
    return {"accuracy": correct / n, "n": n, "per_question": per_question}


def _last_token_logprobs(model, prompts: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Next-token log-probs [len(prompts), V] (float32, on CPU) after each prompt, in one left-padded forward."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))
    from selfreplay.models.core import CausalLM, unwrap

    if isinstance(unwrap(model), CausalLM):  # the last position's logits only: no [B, T, V] for a 128k vocabulary
        last = model(input_ids, attention_mask, position_ids, head_fn=lambda hidden, head: head(hidden[:, -1]))
    else:
        last = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
    return torch.log_softmax(last.float(), dim=-1).cpu()


MCQ_FORMATS = ("auto", "chat", "plain")


def mcq_chat_format(tokenizer, mcq_format: str = "auto") -> bool:
    """Whether multiple-choice prompts use the chat format (``auto``: when the tokenizer has a chat template)."""
    if mcq_format not in MCQ_FORMATS:
        raise SelfReplayError(f"mcq_format={mcq_format!r}: expected one of {', '.join(MCQ_FORMATS)}")
    return bool(getattr(tokenizer, "chat_template", None)) if mcq_format == "auto" else mcq_format == "chat"


def mcq_evaluator(question_sets: dict[str, list[Question]], tokenizer, mcq_format: str = "auto",
                  batch_size: int = 8):
    """An evaluator for the training loop: ``fn(model) -> {mcq_<name>_accuracy, mcq_average_accuracy}``.

    Every rank scores every question with identical forward calls (FSDP's collectives need that), so all ranks get
    the same numbers without a reduction.
    """
    chat = mcq_chat_format(tokenizer, mcq_format)

    def evaluate(model) -> dict:
        out = {f"mcq_{name}_accuracy": multiple_choice_accuracy(model, tokenizer, questions, batch_size,
                                                                chat=chat)["accuracy"]
               for name, questions in question_sets.items()}
        if len(out) > 1:
            out["mcq_average_accuracy"] = sum(out.values()) / len(out)
        return out

    return evaluate


# --- lm-evaluation-harness ---------------------------------------------------------------------------------------

def require_lm_eval() -> None:
    """A one-line error when lm-evaluation-harness is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise SelfReplayError("--lm-eval: lm-evaluation-harness is not installed: pip install 'lm_eval[hf]'")


def lm_eval_harness(model, tokenizer, tasks: list[str], batch_size: int = 16, **kwargs) -> dict:
    """Run lm-evaluation-harness tasks on an in-memory model; returns its per-task metrics ({task: {metric: v}}).

    Extra keyword arguments (``num_fewshot``, ``limit``, ...) go to ``lm_eval.simple_evaluate``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SelfReplayError("lm-evaluation-harness is not installed: pip install 'lm_eval[hf]'") from None
    if not tasks:
        raise SelfReplayError("lm_eval: no tasks given")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), **kwargs)
    if results is None:  # non-zero ranks under data parallelism get nothing back
        return {}
    return dict(results.get("results", {}))
