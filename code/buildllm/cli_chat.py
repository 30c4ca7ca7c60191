"""The `buildllm chat` and `buildllm finetune sft|dpo` commands (Chapter 10).

Part of the command line (`cli.py` registers these parsers). `finetune sft` turns a
pretrained run into a chat model (chat tokens, a grown embedding, SFT on the
instruction tasks or on an Alpaca/chat JSONL file or URL); `finetune dpo` tunes such a
model on preference pairs of the tasks; `chat` talks to it in the terminal, streaming,
or answers each `--message` and stdin line for scripts.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from buildllm.cli_sample import add_dtype_flag
from buildllm.distributed import DEVICES

if TYPE_CHECKING:  # type hints only: each command imports what it runs
    from buildllm.chat import Message
    from buildllm.model import GPT
    from buildllm.tokenizer import BPETokenizer

COMMANDS = "/reset, /system TEXT, /temperature X, /quit (or Ctrl-D)"


# ---------------------------------------------------------------- chat
def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a fine-tuned model in the terminal",
        description="Chat with a model fine-tuned by `buildllm finetune sft` (or dpo). "
        "Replies stream as they are\ngenerated. The oldest turns are dropped, with a "
        "note on stderr, when the conversation\noutgrows the context. Commands: "
        f"{COMMANDS}.\nWithout a terminal, or with --message, every message (or stdin "
        "line) is one user turn\nand only the replies are printed.",
        epilog="examples:\n"
        "  buildllm chat --checkpoint runs/sft\n"
        '  buildllm chat --checkpoint runs/sft --message "What is 2 plus 3?"\n'
        "  printf 'Count the words: to be or not\\n' | buildllm chat --checkpoint "
        "runs/sft",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a fine-tuned run's out_dir or checkpoint folder")  # fmt: skip
    p.add_argument("--message", action="append", default=[],
                   help="a user message to answer, non-interactively (repeatable)")  # fmt: skip
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest reply")
    p.add_argument("--seed", type=int, default=1337, help="same seed, same replies")
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="auto: cuda, then mps, then cpu")  # fmt: skip
    add_dtype_flag(p)
    p.set_defaults(handler=run_chat)


class ChatSession:
    """A conversation with a model: its messages, sampling settings and commands.

    `send(text)` yields the reply's text as it is generated and keeps the turn;
    `command(line)` runs a slash command and returns what to tell the user.
    """

    def __init__(
        self, model: GPT, tokenizer: BPETokenizer, args: argparse.Namespace
    ) -> None:
        import torch

        from buildllm.chat import CHAT_TOKENS, END

        if not set(CHAT_TOKENS) <= set(tokenizer.special_tokens):
            raise ValueError(
                f"{args.checkpoint} has no chat tokens, so it was not fine-tuned for "
                "chat; make one with: buildllm finetune sft --checkpoint "
                f"{args.checkpoint} --out-dir runs/sft"
            )
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_k = args.temperature, args.top_k
        self.max_new_tokens = args.max_new_tokens
        self.system = args.system
        self.messages: list[Message] = []
        self.reset()
        device = next(model.parameters()).device
        self.generator = torch.Generator(device).manual_seed(args.seed)
        self.stop_tokens = {tokenizer.special_tokens[END]}
        if tokenizer.eot_id is not None:
            self.stop_tokens.add(tokenizer.eot_id)

    def reset(self) -> None:
        """Forget the conversation, keeping the system message."""
        self.messages = [{"role": "system", "content": self.system}] * bool(self.system)

    def command(self, line: str) -> str | None:
        """Run a slash command; return a message for the user, None for /quit."""
        name, _, rest = line.partition(" ")
        if name == "/quit":
            return None
        if name == "/reset":
            self.reset()
            return "(conversation reset)"
        if name == "/system":
            self.system = rest.strip() or None
            self.reset()
            return f"(system message {'set' if self.system else 'removed'}; reset)"
        if name == "/temperature":
            try:
                value = float(rest)
            except ValueError:
                value = -1.0
            if not value >= 0:
                return f"(/temperature needs a number >= 0, e.g. /temperature 0.7; got {rest!r})"
            self.temperature = value
            return f"(temperature {value:g})"
        return f"(unknown command {name!r}; commands: {COMMANDS})"

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn, stream the reply's text and add it as the assistant's turn."""
        from buildllm.chat import fit_context, render_chat
        from buildllm.generate import stream, token_bytes

        self.messages.append({"role": "user", "content": text})
        context = self.model.config.context_length
        budget = context - min(self.max_new_tokens, context // 2)
        self.messages, dropped = fit_context(self.tokenizer, self.messages, budget)
        if dropped:
            print(f"(dropped the {dropped} oldest message(s) to fit the context of "
                  f"{context} tokens)", file=sys.stderr)  # fmt: skip
        ids, _ = render_chat(self.tokenizer, self.messages, add_generation_prompt=True)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply = ""
        sampling = {"temperature": self.temperature, "top_k": self.top_k,
                    "generator": self.generator}  # fmt: skip
        for token in stream(self.model, ids, self.max_new_tokens, self.stop_tokens,
                            **sampling):  # fmt: skip
            if token in self.stop_tokens:
                break
            piece = utf8.decode(token_bytes(self.tokenizer, token))
            reply += piece
            yield piece
        piece = utf8.decode(b"", final=True)
        reply += piece
        yield piece
        self.messages.append({"role": "assistant", "content": reply})


def run_chat(args: argparse.Namespace) -> int:
    from buildllm.cli_sample import load_cli_model, run_tokenizer

    model = load_cli_model(args.checkpoint, None, args.device, args.dtype)
    session = ChatSession(model, run_tokenizer(args.checkpoint), args)
    interactive = not args.message and sys.stdin.isatty()
    lines = iter(args.message) if args.message else None
    if interactive:
        print(f"Chatting with {args.checkpoint}. Commands: {COMMANDS}.")
    while True:
        try:
            if lines is not None:
                line = next(lines)
            elif interactive:
                line = input("you> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
        except (EOFError, StopIteration):
            if interactive:
                print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line.strip())
            if said is None:
                return 0
            print(said, file=sys.stdout if interactive else sys.stderr, flush=True)
            continue
        if interactive:
            sys.stdout.write("bot> ")
        for piece in session.send(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


# ---------------------------------------------------------------- finetune
def add_chat_stages(stages: argparse._SubParsersAction) -> None:
    """Register `sft` and `dpo` under `buildllm finetune` (cli_finetune.py)."""
    sft = stages.add_parser(
        "sft",
        help="supervised fine-tuning into a chat model",
        description="Add the chat tokens to a pretrained run, grow its embedding and "
        "fine-tune it on\nconversations: the built-in instruction tasks (--data tasks) "
        "or an Alpaca-style\n.json or chat .jsonl file or URL. Only the assistant's "
        "tokens are learned.",
        epilog="examples:\n"
        "  buildllm finetune sft --checkpoint runs/tiny --out-dir runs/sft\n"
        "  buildllm finetune sft --checkpoint runs/tiny --data alpaca.json "
        "--out-dir runs/alpaca\n"
        "  buildllm finetune sft --checkpoint ~/gpt2 --device cuda --out-dir "
        "runs/gpt2-chat  # a Hugging Face GPT-2 folder",
    )
    sft.add_argument("--data", default="tasks",
                     help="'tasks', or a .json (Alpaca) / .jsonl (chat) file or URL")  # fmt: skip
    sft.add_argument("--sha256", default=None, help="expected hash of a --data URL")
    sft.add_argument("--max-lr", type=float, default=2e-3, help="peak learning rate")
    sft.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack each batch's conversations into full rows (same loss, fewer "
        "padded positions)",
    )
    sft.set_defaults(handler=run_finetune, stage="sft", max_steps_default=300)
    dpo = stages.add_parser(
        "dpo",
        help="direct preference optimisation of a chat model",
        description="Tune a model made by `finetune sft` on pairs of the instruction "
        "tasks: chosen is\nthe verified answer, rejected the model's own wrong answer "
        "(or another example's).\nThe reference model is the starting checkpoint, "
        "frozen.",
        epilog="example:\n"
        "  buildllm finetune dpo --checkpoint runs/sft --out-dir runs/dpo --beta 0.1",
    )
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO's beta (eq-dpo)")
    dpo.add_argument("--max-lr", type=float, default=1e-5, help="peak learning rate")
    dpo.set_defaults(handler=run_finetune, stage="dpo", max_steps_default=20)
    for p, per_task in ((sft, 300), (dpo, 40)):
        p.add_argument("--checkpoint", required=True, metavar="RUN",
                       help="the run to start from (its out_dir or a checkpoint), or "
                       "a Hugging Face GPT-2 folder")  # fmt: skip
        p.add_argument("--out-dir", required=True, help="where the new run is written")
        p.add_argument("--examples-per-task", type=int, default=per_task,
                       help="training examples of each instruction task")  # fmt: skip
        p.add_argument("--max-steps", type=int, default=None,
                       help="optimizer steps (default: 300 for sft, 20 for dpo)")  # fmt: skip
        p.add_argument("--batch-size", type=int, default=32 if p is sft else 16,
                       help="conversations (sft) or pairs (dpo) per step")  # fmt: skip
        p.add_argument("--seed", type=int, default=1337, help="data order and draws")
        p.add_argument("--device", default="cpu", choices=list(DEVICES),
                       help="auto: cuda, then mps, then cpu")  # fmt: skip
        p.add_argument("--json", action="store_true", help="print one JSON object")


def run_finetune(args: argparse.Namespace) -> int:
    import copy
    from pathlib import Path

    from buildllm.chat import add_chat_tokens, resize_vocab
    from buildllm.classify_run import load_base
    from buildllm.distributed import resolve_device
    from buildllm.instructions import build_examples, generate_answers
    from buildllm.train import TrainConfig, Trainer

    if args.examples_per_task < 1 or args.batch_size < 1:
        raise ValueError("--examples-per-task and --batch-size must be at least 1")
    device = resolve_device(args.device)
    model, pretrained_tokenizer = load_base(args.checkpoint, device)  # run or HF folder
    tokenizer = add_chat_tokens(pretrained_tokenizer)
    model = resize_vocab(model, max(tokenizer.vocab_size, model.config.vocab_size))
    T = model.config.context_length
    val = build_examples("test", 8, seed=args.seed)
    if args.stage == "sft":
        from buildllm.sft import SFTObjective

        if args.data == "tasks":
            train = [e.messages() for e in build_examples("train", args.examples_per_task,
                                                          seed=args.seed)]  # fmt: skip
        else:
            from buildllm.chat import load_conversations

            train = load_conversations(args.data, args.sha256)
        objective = SFTObjective(
            tokenizer,
            train,
            [e.messages() for e in val],
            T,
            args.batch_size,
            seed=args.seed,
            packing=args.packing,
        )
    else:
        from buildllm.dpo import DPOObjective, make_pairs

        train = build_examples("train", args.examples_per_task, seed=args.seed + 1)
        pairs = make_pairs(train, generate_answers(model, tokenizer, train))
        val_pairs = make_pairs(val, generate_answers(model, tokenizer, val))
        reference = copy.deepcopy(model).eval()
        objective = DPOObjective(tokenizer, reference, pairs, val_pairs, T,
                                 args.batch_size, args.beta, seed=args.seed)  # fmt: skip
    steps = args.max_steps or args.max_steps_default
    config = TrainConfig(
        model=model.config, out_dir=str(Path(args.out_dir)), batch_size=args.batch_size,
        max_steps=steps, max_lr=args.max_lr, min_lr=args.max_lr / 10,
        warmup_steps=min(10, steps // 10), eval_interval=max(1, steps // 4),
        checkpoint_interval=steps, sample_tokens=None, seed=args.seed,
        device=device, dtype="float32" if device == "cpu" else "auto",
    )  # fmt: skip  # CPU bf16: slower for the tiny model (measured on AMD and AMX)
    records = Trainer(config, objective=objective, model=model).fit()
    last = records[-1]
    result = {"stage": args.stage, "out_dir": args.out_dir, "steps": last["step"],
              "loss": last["loss"], "val_loss": last.get("val_loss")}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.stage}: {last['step']} steps, validation loss "
              f"{last['val_loss']:.4f}; chat with: buildllm chat --checkpoint "
              f"{args.out_dir}")  # fmt: skip
    return 0
