"""The CPU demo's tokenizer: one token per character of printable ASCII, plus chat special tokens.

Built with the `tokenizers` library and saved as a `PreTrainedTokenizerFast` directory, so the demo goes
through exactly the code path of a real model: AutoTokenizer, the chat template, EOS as the stop token.
Character level keeps digits separate, which is what lets a tiny model learn arithmetic.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"  # ends every chat turn, so generation stops on it
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)
CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))  # newline and printable ASCII

# One turn is <|role|>content<|end|>; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer, special tokens first (pad = 0, eos = 1)."""
    vocab = {token: token_id for token_id, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    # BPE with no merges is a character model that still maps unknown characters to <|unk|>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()  # characters join without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def save_demo_tokenizer(directory: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json (chat template included) for offline AutoTokenizer."""
    directory = Path(directory)
    build_demo_tokenizer().save_pretrained(directory)
    return directory
