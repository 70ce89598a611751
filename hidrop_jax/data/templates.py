"""Chat templates as LLaVA renders them, split at the image and with the answers' character
spans, so the pipeline can tokenize the text on both sides of the image and mark answer tokens
exactly (by token offsets) for any fast tokenizer.

`v1` (stage 2, Vicuna v1, LLaVA's `conv_vicuna_v1`):
    {SYSTEM} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...
    answer spans: "{a}</s>" (LLaVA trains on the answer and its `</s>`).
`v1_nosys`: `v1` without the system sentence (29 constant tokens of context that carry no
    information; the CPU demo drops them to train on 30% fewer text rows):
    USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...
`plain` (stage 1, LLaVA's `conv_llava_plain`, first round only, no question):
    <image>\\n{a1}\\n          answer span "{a1}\\n"
  LLaVA itself writes `<image>{a1}\\n`; the newline after the image gives the text stream a row
  that predicts the first answer token (the row before it would be the last vision token, whose
  logits the model never computes). A text-only sample (no image) keeps its question:
  `{q1}\\n{a1}\\n`.

`qwen2` (Qwen2-VL / Qwen2.5-VL-Instruct's `chat_template.json`, default system message):
    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q1}<|im_end|>\n
    <|im_start|>assistant\n{a1}<|im_end|>\n<|im_start|>user\n{q2}<|im_end|>\n...
  (lines joined; the image splits the text between `<|vision_start|>` and `<|vision_end|>`, the
  processor repeats `<|image_pad|>` once per merged vision token). Answer spans: "{a}<|im_end|>"
  (the answer and its end-of-turn token, which is what generation stops at; the "\n" after it
  is template text).

The image always sits at the start of the first question (LLaVA moves it there as well).
"""

from __future__ import annotations

from typing import NamedTuple

V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_SYSTEM = "You are a helpful assistant."
TEMPLATES = ("plain", "v1", "v1_nosys", "qwen2")
TEMPLATE_STRINGS = (V1_SYSTEM, "USER: ASSISTANT: </s>", "\n")
QWEN_TEMPLATE_STRINGS = (QWEN_SYSTEM, "system user assistant", "\n")  # besides special tokens


class Rendered(NamedTuple):
    before: str                      # text before the image ("" for no image)
    after: str                       # text after the image (everything, for no image)
    spans: list[tuple[int, int]]     # answer (start, end) character spans in `after`, by round


def render(template: str, questions, answers, has_image: bool) -> Rendered:
    if template not in TEMPLATES:
        raise ValueError(f"chat template {template!r} is unknown; allowed: {TEMPLATES}")
    if len(questions) != len(answers) or not questions:
        raise ValueError(f"need ≥ 1 question/answer pair; got {len(questions)} questions and "
                         f"{len(answers)} answers")
    parts: list[tuple[str, bool]] = []  # (text, is_answer) after the image
    if template == "qwen2":
        return _render_qwen2(questions, answers, has_image)
    if template == "plain":
        before = ""
        parts.append(("\n" if has_image else questions[0] + "\n", False))
        parts.append((answers[0] + "\n", True))
    else:
        system = V1_SYSTEM + " " if template == "v1" else ""
        before = system + "USER: " if has_image else ""
        for r, (q, a) in enumerate(zip(questions, answers)):
            if r == 0:
                head = "\n" + q if has_image else system + "USER: " + q
            else:
                head = "USER: " + q
            parts.append((head + " ASSISTANT: ", False))
            parts.append((a + "</s>", True))
    after, spans = "", []
    for text, is_answer in parts:
        if is_answer:
            spans.append((len(after), len(after) + len(text)))
        after += text
    return Rendered(before, after, spans)


def _render_qwen2(questions, answers, has_image: bool) -> Rendered:
    system = f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    before = system + "<|vision_start|>" if has_image else ""
    after, spans = "<|vision_end|>" if has_image else system, []
    for r, (q, a) in enumerate(zip(questions, answers)):
        if r:
            after += "<|im_start|>user\n"
        after += q + "<|im_end|>\n<|im_start|>assistant\n"
        spans.append((len(after), len(after) + len(a) + len("<|im_end|>")))
        after += a + "<|im_end|>\n"
    return Rendered(before, after, spans)
