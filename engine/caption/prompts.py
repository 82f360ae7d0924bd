"""How the model is asked: the conversation and its chat template (the instruction texts are in
engine/spec/dataset/captions.py, where the app shows them).

The conversation is Qwen2.5-VL-Instruct's: a system turn, one user turn holding the images then the instruction,
and the assistant's turn opened for the answer. Each image is `<|vision_start|><|image_pad|><|vision_end|>`; the
processor expands `<|image_pad|>` to the image's vision tokens. Qwen/Qwen-Image's tokenizer folder ships the
text-only Qwen2.5 template (it cannot place images), so the vision-language template below is used unless the
tokenizer brings one that places images itself.
"""

from __future__ import annotations

SYSTEM = "You are a helpful assistant."

# Qwen2.5-VL-Instruct's conversation format: ChatML turns; images inline in a user turn; a default system turn.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def messages(n_images: int, text: str) -> list[dict]:
    """The conversation: the images (controls first, the target last) and the instruction in one user turn."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def chat_template(tokenizer) -> str:
    """The tokenizer's own template when it places images; otherwise Qwen2.5-VL's (VL_CHAT_TEMPLATE)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and "vision_start" in own:
        return own
    return VL_CHAT_TEMPLATE


def prompt_text(tokenizer, n_images: int, text: str) -> str:
    """The full prompt string, ending with the opened assistant turn, through the tokenizer's apply_chat_template."""
    return tokenizer.apply_chat_template(messages(n_images, text), chat_template=chat_template(tokenizer),
                                         tokenize=False, add_generation_prompt=True)


def finish(text: str, trigger_word: str | None) -> str:
    """The caption as written to disk: one line, surrounding quotes dropped, the trigger word in front."""
    caption = " ".join(text.split()).strip().strip('"').strip()
    prefix = (trigger_word or "").strip()
    if prefix and not caption.startswith(prefix):
        caption = f"{prefix}, {caption}" if caption else prefix
    return caption
