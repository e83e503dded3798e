"""`quadrant train --eagle MODEL`: train an EAGLE draft head (models/eagle.py) on the target's own answers.

1. Conversations: chat prompts built from the shipped texts (the calibration chapters of Alice in
   Wonderland, under quant/data: rewrite, summarise, continue, question) and a fixed list of open
   questions and coding tasks. The target answers each greedily, so the head learns what the target
   says, which is what verification accepts (self-distillation, as EAGLE's authors advise).
2. One pass of the target over every conversation gives its final hidden state and its own next-token
   choice at every position; the head's input embeddings are the target's, computed once.
3. The head learns, at every position p, the target's hidden state at p from the state at p - 1
   (with a little noise, since at drafting time it reads its own guesses) and token p: a smooth-L1
   loss on the state plus 0.1 of the cross-entropy of the target's choice over the draft vocabulary
   (EAGLE's mix), the LM head frozen.
4. A tenth of the conversations is held out: the head's top-1 agreement with the target there, on
   true states (the first draft) and on its own guess (the second), goes into the head's record.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quadrant.config import ModelConfig
from quadrant.errors import QuadrantError
from quadrant.layers.attention import AttentionMetadata
from quadrant.models.eagle import EagleHead, head_config

TEMPLATES = (
    "Rewrite this passage in plain modern English:\n\n{text}",
    "Summarise this passage in a few sentences:\n\n{text}",
    "Continue this story for a paragraph:\n\n{text}",
    "What happens in this passage, and who is in it?\n\n{text}",
    "Rewrite this passage with 'Alice' replaced by 'Ada', changing nothing else:\n\n{text}",
    "Write two questions about this passage and answer them:\n\n{text}",
)
QUESTIONS = (
    "What are three good habits for staying healthy?", "Explain how a rainbow forms.",
    "Give me a short recipe for pancakes.", "What is the difference between weather and climate?",
    "Write a short poem about the sea.", "How do I make a good first impression at a job interview?",
    "Explain photosynthesis to a ten-year-old.", "What are the planets of the solar system?",
    "Suggest a plan for learning a new language.", "Why is the sky blue?",
    "Write a polite email asking for a meeting next week.", "What causes earthquakes?",
    "List some tips for saving money.", "Describe the water cycle.", "How does a computer store numbers?",
    "What should I pack for a weekend hiking trip?", "Tell me a short story about a brave mouse.",
    "Explain what a prime number is, with examples.", "How can I sleep better?",
    "What are the benefits of reading books?",
)
CODE_TASKS = (
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python class for a simple stack with push, pop and peek.",
    "Write a Python function that counts the words in a text file.",
    "Explain what a for loop does in Python, with an example.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that reverses the words of a sentence.",
)


@dataclass
class EagleTrainConfig:
    target: str  # the model the head drafts for (catalogue name, .gguf or folder)
    output: str  # the head's folder (must not exist)
    num_passages: int = 256  # chat prompts built from the shipped texts (plus the fixed questions and tasks)
    max_answer_tokens: int = 192
    draft_vocab_size: int = 8192
    epochs: int = 16
    batch_tokens: int = 4096
    lr: float = 1e-3
    noise: float = 0.1  # std of the noise on input states, relative to their RMS
    cls_weight: float = 0.1
    seed: int = 0


def conversations(num_passages: int, seed: int) -> list[list[dict[str, str]]]:
    data = resources.files("quadrant.quant") / "data"
    text = "\n".join((data / name).read_text(encoding="utf-8") for name in ("calibration.txt", "calibration_more.txt"))
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    rng = random.Random(seed)
    rng.shuffle(paragraphs)
    # Past the last paragraph the passages come round again under the next template.
    chats = [[{"role": "user", "content": TEMPLATES[(i + i // len(paragraphs)) % len(TEMPLATES)]
               .format(text=paragraphs[i % len(paragraphs)][:700])}] for i in range(num_passages)]
    chats += [[{"role": "user", "content": q}] for q in QUESTIONS + CODE_TASKS]
    rng.shuffle(chats)
    return chats


@dataclass
class _Corpus:
    """Per conversation: token ids, the target's final hidden states, its next-token choices, embeddings."""

    ids: list[torch.Tensor]
    states: list[torch.Tensor]
    choices: list[torch.Tensor]
    embeds: list[torch.Tensor]


@torch.no_grad()  # not inference mode: the head trains on these tensors
def target_pass(model: Any, sequences: list[list[int]]) -> _Corpus:
    corpus = _Corpus([], [], [], [])
    for seq in tqdm(sequences, desc="target hidden states", unit=" conv"):
        ids = torch.tensor(seq)
        hidden = model(ids, torch.arange(len(seq)), AttentionMetadata.for_packed_sequences([len(seq)]))
        choices = torch.cat([model.compute_logits(part).argmax(-1) for part in hidden.split(256)])
        corpus.ids.append(ids)
        corpus.states.append(hidden.float().clone())
        corpus.choices.append(choices)
        corpus.embeds.append(model.model.embed_tokens(ids).float().clone())
    return corpus


@torch.no_grad()
def _lm_head_rows(model: Any, rows: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """The target's LM head matrix at `rows` [Vd, D], read through whatever format it is packed in."""
    logits = model.lm_head(torch.eye(hidden_size)).float()  # [D, V] = W^T
    softcap = model.config.final_logit_softcapping
    if softcap:
        logits = softcap * torch.atanh((logits / softcap).clamp(-0.999999, 0.999999))
    return logits[:, rows].T.contiguous()


def _batches(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in order:
        if current and size + lengths[i] > batch_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += lengths[i]
    return batches + ([current] if current else [])


def _inputs(corpus: _Corpus, batch: list[int], noise: float, gen: torch.Generator | None):
    """Packed head inputs: embeddings of tokens p, the states at p - 1 (zeros at 0), positions, meta."""
    embeds = torch.cat([corpus.embeds[i] for i in batch])
    prev = []
    for i in batch:
        s = corpus.states[i]
        prev.append(torch.cat([s.new_zeros(1, s.shape[1]), s[:-1]]))
    states = torch.cat(prev)
    if noise and gen is not None:
        rms = states.pow(2).mean().sqrt()
        states = states + noise * rms * torch.randn(states.shape, generator=gen)
    lengths = [len(corpus.ids[i]) for i in batch]
    positions = torch.cat([torch.arange(n) for n in lengths])
    return embeds, states, positions, AttentionMetadata.for_packed_sequences(lengths)


@torch.no_grad()
def _agreement(head: EagleHead, corpus: _Corpus, held: list[int]) -> tuple[float, float]:
    """Held-out top-1 agreement with the target: the first draft (true states) and the second (fed the
    head's own guess at the previous position instead)."""
    first = second = total = 0
    for i in held:
        embeds, states, positions, meta = _inputs(corpus, [i], 0.0, None)
        guess = head.from_embeddings(embeds, positions, meta, states)
        target = corpus.choices[i]
        pick = head.draft_vocab[head.draft_logits(guess).argmax(-1)]
        first += int((pick == target).sum())
        fed = torch.cat([states[:1], guess[:-1]])  # position p reads the guess made at p - 1
        pick2 = head.draft_vocab[head.draft_logits(head.from_embeddings(embeds, positions, meta, fed)).argmax(-1)]
        second += int((pick2[1:] == target[1:]).sum())
        total += len(target)
    return first / max(total, 1), second / max(total - len(held), 1)


def draft_vocabulary(corpus: _Corpus, vocab_size: int, size: int, always: frozenset[int]) -> torch.Tensor:
    """The `size` tokens the target chooses most often in the corpus (and `always`, e.g. EOS), sorted."""
    counts = torch.bincount(torch.cat(corpus.choices), minlength=vocab_size)
    for token in always:
        counts[token] = counts.max() + 1
    return counts.argsort(descending=True)[: min(size, vocab_size)].sort().values


def init_head(model: Any, config: ModelConfig, draft_vocab: torch.Tensor, target_name: str) -> EagleHead:
    """A head for `model` (a loaded target): the target's LM head rows and final norm, the rest random."""
    head = EagleHead(head_config(config), draft_vocab, target_name)
    with torch.no_grad():
        head.lm_head.weight.copy_(_lm_head_rows(model, draft_vocab, config.hidden_size))
        head.norm.weight.copy_(model.model.norm.weight.float())
    head.lm_head.weight.requires_grad_(False)  # frozen, as EAGLE keeps the target's
    return head


def fit_head(head: EagleHead, corpus: _Corpus, config: EagleTrainConfig, log: Any = print) -> list[dict[str, float]]:
    """Train the head on the corpus, the last tenth of its conversations held out; per epoch: losses,
    train top-1 and held-out agreement (first and second draft)."""
    n = len(corpus.ids)
    held = list(range(n - max(1, n // 10), n))
    train = list(range(n - len(held)))
    vocab = head.config.vocab_size
    to_draft = torch.full((vocab,), -100, dtype=torch.long)
    to_draft[head.draft_vocab] = torch.arange(len(head.draft_vocab))
    lengths = [len(ids) for ids in corpus.ids]
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(config.seed)
    steps_per_epoch = len(_batches(train, lengths, config.batch_tokens))
    total_steps, step = steps_per_epoch * config.epochs, 0
    warmup = min(20, total_steps // 10 + 1)
    history: list[dict[str, float]] = []
    bar = tqdm(total=total_steps, desc="train EAGLE head", unit=" step")
    for epoch in range(config.epochs):
        order = list(train)
        rng.shuffle(order)
        sums = [0.0, 0.0, 0, 0]  # regression, classification, correct, counted
        for batch in _batches(order, lengths, config.batch_tokens):
            lr = config.lr * ((step + 1) / warmup if step < warmup else
                              0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1))))
            for group in optim.param_groups:
                group["lr"] = lr
            embeds, states, positions, meta = _inputs(corpus, batch, config.noise, gen)
            target_states = torch.cat([corpus.states[i] for i in batch])
            labels = to_draft[torch.cat([corpus.choices[i] for i in batch])]
            guess = head.from_embeddings(embeds, positions, meta, states)
            reg = F.smooth_l1_loss(guess, target_states)
            logits = head.draft_logits(guess)
            cls = F.cross_entropy(logits, labels, ignore_index=-100)
            loss = reg + config.cls_weight * cls
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optim.step()
            valid = labels >= 0
            sums[0] += float(reg.detach())
            sums[1] += float(cls.detach())
            sums[2] += int((logits.argmax(-1)[valid] == labels[valid]).sum())
            sums[3] += int(valid.sum())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        batches = max(steps_per_epoch, 1)
        first, second = _agreement(head, corpus, held)
        record = {"epoch": epoch + 1, "regression": sums[0] / batches, "cross_entropy": sums[1] / batches,
                  "train_top1": sums[2] / max(sums[3], 1), "heldout_first_draft": first, "heldout_second_draft": second}
        history.append(record)
        log(f"epoch {epoch + 1}: smooth-L1 {record['regression']:.4f}  CE {record['cross_entropy']:.3f}  "
            f"train top-1 {record['train_top1']:.3f}  held-out agreement {first:.3f} (1st draft), {second:.3f} (2nd)")
    bar.close()
    return history


def train_eagle(config: EagleTrainConfig, log: Any = print) -> Path:
    """Generate the conversations with the target, train a head on them, write its folder."""
    from quadrant import SamplingParams
    from quadrant.engine.engine import LLM

    out = Path(config.output)
    if out.exists():
        raise QuadrantError(f"{out} exists; give a new folder for the head")
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    llm = LLM(config.target)
    engine = llm.engine
    chats = conversations(config.num_passages, config.seed)
    answers = llm.chat(chats, SamplingParams(max_tokens=config.max_answer_tokens, temperature=0.0))
    sequences = [engine.chat_prompt(c) + list(a.outputs[0].token_ids) for c, a in zip(chats, answers)]
    corpus = target_pass(engine.model, sequences)
    draft_vocab = draft_vocabulary(corpus, engine.model_config.vocab_size, config.draft_vocab_size,
                                   engine.eos_token_ids)
    choices = torch.cat(corpus.choices)
    covered = float(torch.isin(choices, draft_vocab).float().mean())  # of the target's choices, those drafted
    head = init_head(engine.model, engine.model_config, draft_vocab, config.target)
    engine.shutdown()
    del llm, engine  # the target's weights are no longer needed
    history = fit_head(head, corpus, config, log)
    tokens = sum(len(ids) for ids in corpus.ids)
    extra = {"training": {**asdict(config), "conversations": len(sequences), "tokens": tokens,
                          "draft_vocab_coverage": covered, "seconds": time.perf_counter() - start,
                          "history": history}}
    head.save(out, extra)
    log(f"{out}: EAGLE head for {config.target} ({sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters, "
        f"draft vocabulary {len(draft_vocab)}, {covered:.1%} of the target's choices), trained on {tokens} tokens "
        f"in {time.perf_counter() - start:.0f} s")
    return out
