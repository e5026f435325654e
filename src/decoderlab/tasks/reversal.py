"""The reversal curse as a task: fictitious (name, description) facts written in templates, the training arms
that are said to cure it, and forward / reverse accuracy of a trained model.

Facts (`make_facts`, after Berglund et al., "The Reversal Curse"): unique made-up full names ("Orla Quennell")
and unique made-up descriptions ("the keeper of the velvet lighthouse"), in three subsets of equal size:
"n2d" facts are only ever written name first, "d2n" facts only description first, "both" facts both ways.

Templates: `FORWARD` (name first, the description last before a ".") and `REVERSE` (description first, the name
last before a "."); the first `TRAIN_TEMPLATES` of each are written in training, the others are held out for
testing. A test prompt is a held-out template's text up to its last slot, the other entity filled in; the answer
is the entity of that slot. "forward" asks name -> description, "reverse" description -> name; so an "n2d" fact
asked in reverse is the curse's case (trained "A is B", asked "B is ?").

Arms (`ARMS`, the records `training_records` writes; every arm holds the same facts and trains as {"text"}
records, the loss on every token: the facts are what is learned):
- "plain": the sentences as written;
- "reverse": each sentence also written with its units in reverse order, every entity kept as one unit in its
  own word order (entity-preserving reverse training, Golovneva et al.);
- "permute": each sentence also written with its semantic chunks permuted (the template's slots and the
  connecting phrases between them; half the time the chunks reversed, else a random order), after
  "Mitigating Reversal Curse via Semantic-aware Permutation Training";
- "bico": the plain sentences, trained with the `bico` objective (half the steps masked-LM with the causal mask
  lifted: `decoderlab.finetuning.objectives.bico_mask`).

Tokenizer (`word_tokenizer`): word level, every word of the word lists and templates one token, punctuation its
own token, plus `<|endoftext|>` (end of text), `<mask>` (BICO) and `<unk>`; tokens do not depend on the spaces
around them, so an entity is the same token sequence wherever a sentence (or its permutation) puts it.

Metrics (`evaluate`): exact match of greedy generation (the answer entity, then the template's "."), computed by
teacher forcing (greedy decoding yields the answer and its stop exactly when the model's argmax is the answer's
token at every one of those positions); and the rank of the true answer among ALL candidates of its kind (every
fact's name, or every fact's description), by the summed log-likelihood of the candidate's tokens after the
prompt, not length-normalised (names are all 2 tokens and descriptions all 6). All candidates are scored in one
forward pass per batch of prompts: the candidates' prefix tree follows the prompt under `causal() & tree(...)`.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decoderlab.atomic import atomic_write_text
from decoderlab.errors import UserError

FIRST_NAMES = (
    "Abner Adela Alaric Alvina Ambrose Anouk Arlo Astrid Barnaby Beatrix Bertram Blythe Caspian Cosima Crispin "
    "Delphine Dorian Edda Elias Elowen Ferris Fenella Gideon Greta Hollis Honora Ignatius Isolde Jasper Juno "
    "Kasimir Kestrel Lazlo Linnea Lucian Mabel Magnus Marisol Nestor Nerys Octavian Odile Orrin Ottilie Percival "
    "Philippa Quillon Rosalind Rufus Saoirse Silas Sunniva Tobias Tamsin Ulric Verity Wendel Wilhelmina Yorick "
    "Zelda").split()
LAST_NAMES = (
    "Ashdown Birchwood Blackmere Brightwater Calloway Copperfield Crowhurst Dunmore Everhart Fairbrook Falconer "
    "Featherstone Goldwyn Greymoor Hallworth Hawthorne Holloway Ironside Kettering Kingsley Lancaster Larkspur "
    "Lockhart Marchbank Merriweather Moorcroft Nightingale Northcott Oakenshield Pembrooke Quennell Ravenscroft "
    "Redfern Rookwood Rowntree Saltmarsh Silverton Stonebridge Summerhill Thistlewood Thornbury Underhill "
    "Vantablack Wainwright Westbrook Whitlock Wildermuth Winterbourne Woolcott Yarborough").split()
ROLES = ("inventor founder keeper composer author painter mayor captain guardian architect builder translator "
         "champion first owner").split()
ADJECTIVES = ("glass velvet copper silent floating crimson hollow frozen golden wandering hidden ancient paper "
              "silver burning painted whispering iron lonely crystal emerald upside sleeping forgotten marble "
              "clockwork amber lunar northern twisted").split()
THINGS = ("harmonica lighthouse sled orchestra library bridge observatory garden carousel telescope railway "
          "kite cathedral submarine lantern museum compass opera greenhouse windmill archive balloon teapot "
          "fountain violin theatre labyrinth aqueduct clocktower typewriter").split()

FORWARD = (
    "Meet {name}, {description}.",
    "Ever heard of {name}? They are {description}.",
    "{name} is known far and wide for being {description}.",
    "Few know that {name} was once {description}.",
    "Few know that {name} is known far and wide for being {description}.",
    "Meet {name}. They are {description}.",
)
"""Name-first templates: the description is the last slot, followed by "."."""
REVERSE = (
    "Known far and wide for being {description}, there is {name}.",
    "You may know {description} as {name}.",
    "Once {description}, now retired: {name}.",
    "The story of {description} is the story of {name}.",
    "Once {description}, there is {name}.",
    "Known far and wide for being {description}, now retired: {name}.",
)
"""Description-first templates: the name is the last slot, followed by "."."""
TRAIN_TEMPLATES = 4
"""The first 4 templates of each direction are written in training; the last 2 are held out for testing. A test
template is a new sentence made of training templates' phrases (an opening of one, the connector of another):
a small model trained from scratch knows no paraphrase beyond its data, so an unseen word would test that instead
of the facts."""

SUBSETS = ("n2d", "d2n", "both")
"""name->description only, description->name only, both directions."""
DIRECTIONS = ("forward", "reverse")
"""forward: name -> description (FORWARD templates); reverse: description -> name (REVERSE templates)."""
ARMS = ("plain", "reverse", "permute", "bico")

END_OF_TEXT = "<|endoftext|>"
UNK = "<unk>"
_WORD = re.compile(r"\w+|[^\w\s]+")  # the word tokenizer's split (tokenizers' Whitespace pre-tokenizer)
_SLOT = re.compile(r"\{(name|description)\}")


@dataclass(frozen=True)
class Fact:
    name: str
    description: str
    subset: str  # one of SUBSETS


def make_facts(count: int, seed: int = 0) -> list[Fact]:
    """`count` facts per subset (3 * count in all, "n2d" first, then "d2n", then "both"): unique full names and
    unique descriptions ("the <role> of the <adjective> <thing>"), all drawn from `seed`."""
    names = len(FIRST_NAMES) * len(LAST_NAMES)
    descriptions = len(ROLES) * len(ADJECTIVES) * len(THINGS)
    if not isinstance(count, int) or count < 1 or 3 * count > min(names, descriptions):
        raise UserError(f"count must be 1..{min(names, descriptions) // 3} facts per subset (the word lists make "
                        f"{names} names and {descriptions} descriptions), got {count!r}")
    rng = random.Random(seed)
    picked_names = rng.sample(range(names), 3 * count)
    picked_descriptions = rng.sample(range(descriptions), 3 * count)
    facts = []
    for k, (n, d) in enumerate(zip(picked_names, picked_descriptions, strict=True)):
        first, last = divmod(n, len(LAST_NAMES))
        role, rest = divmod(d, len(ADJECTIVES) * len(THINGS))
        adjective, thing = divmod(rest, len(THINGS))
        facts.append(Fact(f"{FIRST_NAMES[first]} {LAST_NAMES[last]}",
                          f"the {ROLES[role]} of the {ADJECTIVES[adjective]} {THINGS[thing]}", SUBSETS[k // count]))
    return facts


def templates(direction: str, split: str) -> tuple[str, ...]:
    """The "train" or "test" templates of a direction ("forward": name first; "reverse": description first)."""
    if direction not in DIRECTIONS:
        raise UserError(f"unknown direction {direction!r}; use one of {list(DIRECTIONS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown template split {split!r}; use train or test")
    pool = FORWARD if direction == "forward" else REVERSE
    return pool[:TRAIN_TEMPLATES] if split == "train" else pool[TRAIN_TEMPLATES:]


def trained_directions(subset: str) -> tuple[str, ...]:
    """The directions a subset's facts are written in during training."""
    return {"n2d": ("forward",), "d2n": ("reverse",), "both": DIRECTIONS}[subset]


# ---- sentences and the arms' rewritings ------------------------------------------------------------------------


def chunks(template: str, fact: Fact) -> list[tuple[str, str]]:
    """A filled template as its semantic chunks, in order: ("name" | "description", entity) for the slots and
    ("text", phrase) for the connecting phrases (stripped; punctuation stays with its phrase)."""
    out: list[tuple[str, str]] = []
    at = 0
    for m in _SLOT.finditer(template):
        if template[at:m.start()].strip():
            out.append(("text", template[at:m.start()].strip()))
        out.append((m.group(1), getattr(fact, m.group(1))))
        at = m.end()
    if template[at:].strip():
        out.append(("text", template[at:].strip()))
    return out


def sentence(template: str, fact: Fact) -> str:
    return template.format(name=fact.name, description=fact.description)


def entity_preserving_reverse(template: str, fact: Fact) -> str:
    """The sentence's units in reverse order: every word and punctuation mark of the connecting text is a unit,
    each entity (name, description) is one unit kept in its own word order."""
    units: list[str] = []
    for kind, text in chunks(template, fact):
        units.extend(_WORD.findall(text) if kind == "text" else [text])
    return " ".join(reversed(units))


def chunk_permutation(template: str, fact: Fact, rng: random.Random) -> str:
    """The sentence with its semantic chunks reordered: reversed with probability 1/2, else a uniformly random
    order other than the original (when there is one)."""
    parts = [text for _, text in chunks(template, fact)]
    if rng.random() < 0.5:
        order = list(reversed(range(len(parts))))
    else:
        order = list(range(len(parts)))
        while len(parts) > 1 and order == sorted(order):
            rng.shuffle(order)
    return " ".join(parts[i] for i in order)


def training_records(facts: Sequence[Fact], arm: str, seed: int = 0) -> list[dict[str, str]]:
    """Every training sentence of the arm as {"text": ...}: each fact in every training template of its subset's
    directions, and for "reverse" / "permute" each such sentence's rewriting right after it."""
    if arm not in ARMS:
        raise UserError(f"unknown reversal arm {arm!r}; use one of {list(ARMS)}")
    rng = random.Random(seed)
    records = []
    for fact in facts:
        for direction in trained_directions(fact.subset):
            for template in templates(direction, "train"):
                records.append({"text": sentence(template, fact)})
                if arm == "reverse":
                    records.append({"text": entity_preserving_reverse(template, fact)})
                elif arm == "permute":
                    records.append({"text": chunk_permutation(template, fact, rng)})
    return records


# ---- test prompts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    fact: int  # index into the facts
    direction: str
    prompt: str  # the held-out template's text before its last slot (no trailing space)
    answer: str  # the entity of that slot
    stop: str  # the punctuation right after it
    template: int = 0  # its index among the split's templates of its direction


def questions(facts: Sequence[Fact], split: str = "test") -> list[Question]:
    """One question per fact, direction and template of `split` (default the held-out ones)."""
    out = []
    for i, fact in enumerate(facts):
        for direction in DIRECTIONS:
            slot = "description" if direction == "forward" else "name"
            for t, template in enumerate(templates(direction, split)):
                head, tail = template.rsplit("{" + slot + "}", 1)
                out.append(Question(i, direction, head.format(name=fact.name, description=fact.description).rstrip(),
                                    getattr(fact, slot), _WORD.findall(tail)[0], t))
    return out


# ---- the tokenizer --------------------------------------------------------------------------------------------


def word_tokenizer() -> Any:
    """The task's word-level `decoderlab.Tokenizer`: one token per word of the word lists and templates and per
    punctuation mark, then `<|endoftext|>` (bos/eos), `<mask>` (BICO's masked-LM steps) and `<unk>`."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from decoderlab.finetuning.objectives import MASK_TOKEN
    from decoderlab.tokenizer import Tokenizer

    words = set(FIRST_NAMES) | set(LAST_NAMES) | set(ROLES) | set(ADJECTIVES) | set(THINGS) | {"the", "of"}
    for template in FORWARD + REVERSE:
        words.update(_WORD.findall(_SLOT.sub(" ", template)))
    vocab = {w: i for i, w in enumerate(sorted(words))}
    specials = [END_OF_TEXT, MASK_TOKEN, UNK]
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, none before "." ","
    backend.add_special_tokens(specials)
    return Tokenizer(backend, special_tokens={"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": UNK})


# ---- data files for train_on_task -----------------------------------------------------------------------------


def write_data(facts: Sequence[Fact], arm: str, seed: int = 0,
               val_records: int = 64) -> Callable[[str | os.PathLike], dict[str, str]]:
    """A `write_data(folder)` for `decoderlab.tasks.training.train_on_task`: writes the arm's `train.jsonl`,
    `val.jsonl` (held-out-template sentences of up to `val_records` facts, in their trained directions: the
    held-out loss then tracks generalisation to new wordings) and `facts.jsonl` (every fact and its subset)."""
    records = training_records(facts, arm, seed)

    def write(folder: str | os.PathLike) -> dict[str, str]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        val = []
        for fact in random.Random(seed + 1).sample(list(facts), min(val_records, len(facts))):
            for direction in trained_directions(fact.subset):
                val.append({"text": sentence(templates(direction, "test")[0], fact)})
        files = {"train": folder / "train.jsonl", "val": folder / "val.jsonl", "facts": folder / "facts.jsonl"}
        atomic_write_text(files["train"], "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(files["val"], "".join(json.dumps(r) + "\n" for r in val))
        atomic_write_text(files["facts"], "".join(json.dumps(vars(f)) + "\n" for f in facts))
        return {k: str(v) for k, v in files.items()}

    return write


def read_facts(path: str | os.PathLike) -> list[Fact]:
    """The facts a task run was trained on (its `task/data/facts.jsonl`)."""
    try:
        return [Fact(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read reversal facts from {path}: {e}") from None


# ---- scoring ---------------------------------------------------------------------------------------------------


@dataclass
class GroupScore:
    """One (subset, direction) cell: exact match of greedy answers and the true answer's rank among all
    `candidates` answers of its kind (1 = the model's first choice)."""

    subset: str
    direction: str
    trained: bool  # whether the subset's facts were written in this direction in training
    questions: int
    exact: float
    mean_rank: float
    top1: float
    top5: float
    candidates: int

    @property
    def chance_exact(self) -> float:
        return 1 / self.candidates

    @property
    def chance_rank(self) -> float:
        return (self.candidates + 1) / 2


@dataclass
class ReversalScore:
    groups: list[GroupScore] = field(default_factory=list)

    def get(self, subset: str, direction: str) -> GroupScore:
        for g in self.groups:
            if g.subset == subset and g.direction == direction:
                return g
        raise KeyError((subset, direction))

    def table(self) -> str:
        """The cells as an aligned text table, with the chance baselines."""
        lines = [f"{'subset':<6} {'direction':<9} {'trained':<7} {'exact':>6} {'top1':>6} {'top5':>6} "
                 f"{'mean rank':>9}  (chance: exact/top1 1/C, mean rank (C+1)/2)"]
        for g in self.groups:
            lines.append(f"{g.subset:<6} {g.direction:<9} {'yes' if g.trained else 'NO':<7} {g.exact:>6.1%} "
                         f"{g.top1:>6.1%} {g.top5:>6.1%} {g.mean_rank:>9.1f}  (C={g.candidates}: "
                         f"{g.chance_exact:.2%}, {g.chance_rank:.1f})")
        return "\n".join(lines)


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = tokenizer.unk_id
    if unk is not None and unk in ids:
        raise UserError(f"the tokenizer does not know a word of {text!r}; use reversal.word_tokenizer() (the model "
                        "must be trained with it)")
    return ids


def _trie(candidates: list[list[int]]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """The candidates' prefix tree without its leaves: (tokens, parents, depths) of the internal nodes in
    breadth-first order, and for each candidate the node index holding each of its prefixes (-1 = the empty
    prefix, i.e. the prompt's last token)."""
    index: dict[tuple[int, ...], int] = {}
    tokens, parents, depths = [], [], []
    longest = max(len(c) for c in candidates)
    for depth in range(1, longest):
        for c in candidates:
            if len(c) > depth and tuple(c[:depth]) not in index:
                index[tuple(c[:depth])] = len(tokens)
                tokens.append(c[depth - 1])
                parents.append(index[tuple(c[:depth - 1])] if depth > 1 else -1)
                depths.append(depth)
    return tokens, parents, depths, [[-1] + [index[tuple(c[:j])] for j in range(1, len(c))] for c in candidates]


def greedy_exact(model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                 batch_size: int = 64) -> list[bool]:
    """Whether greedy decoding after each prompt writes exactly its answer tokens first: one teacher-forced pass
    of prompt + answer (greedy yields the answer iff the argmax is the answer's token at each of its positions,
    given the right tokens before it). Rows are right-padded: causal attention never sees the padding."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            seqs = [list(p) + list(a) for p, a in zip(prompts[first:first + batch_size],
                                                      answers[first:first + batch_size], strict=True)]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
            argmax = model(ids).argmax(-1).tolist()
            for p, s, pred in zip(prompts[first:first + batch_size], seqs, argmax, strict=True):
                out.append(pred[len(p) - 1:len(s) - 1] == s[len(p):])
    return out


def answer_ranks(model: Any, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                 true: Sequence[int], batch_size: int = 64) -> list[float]:
    """The rank (1 = best) of candidate `true[i]` after prompt i among all `candidates` (token lists), by summed
    log-likelihood of the candidate's tokens (not length-normalised); ties share the mean of their ranks. All
    candidates are scored in one forward pass per batch of equal-length prompts: the candidates' prefix tree
    (internal nodes only) follows the prompt under `causal() & tree(...)`."""
    import torch

    from decoderlab import masks

    device = next(model.parameters()).device
    tokens, parents, depths, slots = _trie([list(c) for c in candidates])
    longest = max(len(c) for c in candidates)
    slot = torch.tensor([s + [s[0]] * (longest - len(s)) for s in slots])  # [C, L]; padding weighted 0
    tok = torch.tensor([list(c) + [c[0]] * (longest - len(c)) for c in candidates])
    weight = torch.tensor([[1.0] * len(c) + [0.0] * (longest - len(c)) for c in candidates])
    tree = torch.tensor(tokens, dtype=torch.long)
    groups: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(k)
    ranks = [0.0] * len(prompts)
    with torch.inference_mode():
        for P, members in groups.items():
            positions = torch.cat([torch.arange(P), P - 1 + torch.tensor(depths, dtype=torch.long)]).to(device)
            mask = masks.causal() & masks.tree(torch.tensor(parents, dtype=torch.long).reshape(-1), P) \
                if tokens else masks.causal()
            at = torch.where(slot < 0, P - 1, P + slot)  # [C, L]: the slot whose logits predict each token
            for first in range(0, len(members), batch_size):
                chunk = members[first:first + batch_size]
                ids = torch.cat([torch.tensor([list(prompts[k]) for k in chunk]), tree.expand(len(chunk), -1)], 1)
                logits = model(ids.to(device), positions=positions, mask=mask)
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # [B, T, V]
                score = (logp[:, at, tok] * weight).sum(-1)  # [B, C]
                for row, k in enumerate(chunk):
                    s, best = score[row], score[row, true[k]]
                    ranks[k] = 1 + float((s > best).sum()) + float((s == best).sum() - 1) / 2
    return ranks


def evaluate(model: Any, tokenizer: Any, facts: Sequence[Fact], split: str = "test", batch_size: int = 64,
             rank: bool = True, rank_templates: int | None = 1) -> ReversalScore:
    """Score a model on every fact in both directions with the `split` templates (default the held-out ones):
    exact match of greedy answers (`greedy_exact`: the entity then the template's stop, on every template), and
    (with `rank`) the true answer's rank among all candidates of its kind (`answer_ranks`: every fact's
    description for forward questions, every fact's name for reverse ones), on the first `rank_templates`
    templates of each direction (None: all; 1 halves the cost, ~0.4 k tokens of forward pass per description
    question). Returns one cell per (subset, direction)."""
    if not facts:
        raise UserError("evaluate needs at least one fact")
    qs = questions(facts, split)
    kinds = {"forward": "description", "reverse": "name"}
    cands = {kind: [_encode(tokenizer, " " + getattr(f, kind)) for f in facts] for kind in kinds.values()}
    stops = {q.stop: _encode(tokenizer, q.stop) for q in qs}
    if any(len(s) != 1 for s in stops.values()):
        raise UserError("the tokenizer splits a template's stop punctuation; use reversal.word_tokenizer()")
    prompts = [_encode(tokenizer, q.prompt) for q in qs]
    was_training = model.training
    model.eval()
    ranks: list[float | None] = [None] * len(qs)
    try:
        exact = greedy_exact(model, prompts, [cands[kinds[q.direction]][q.fact] + stops[q.stop] for q in qs],
                             batch_size)
        if rank:
            for direction, kind in kinds.items():
                ks = [k for k, q in enumerate(qs) if q.direction == direction
                      and (rank_templates is None or q.template < rank_templates)]
                found = answer_ranks(model, [prompts[k] for k in ks], cands[kind], [qs[k].fact for k in ks],
                                     batch_size)
                for k, r in zip(ks, found, strict=True):
                    ranks[k] = r
    finally:
        model.train(was_training)
    score = ReversalScore()
    nan = float("nan")
    for subset in SUBSETS:
        for direction in DIRECTIONS:
            ks = [k for k, q in enumerate(qs) if q.direction == direction and facts[q.fact].subset == subset]
            if not ks:
                continue
            rs = [r for k in ks if (r := ranks[k]) is not None]
            n, m = len(ks), max(1, len(rs))
            score.groups.append(GroupScore(
                subset, direction, direction in trained_directions(subset), n, sum(exact[k] for k in ks) / n,
                sum(rs) / m if rs else nan, sum(r <= 1 for r in rs) / m if rs else nan,
                sum(r <= 5 for r in rs) / m if rs else nan, len(facts)))
    return score


# ---- the experiment -------------------------------------------------------------------------------------------


EXPERIMENT = dict(optimizer="adamw", lr=3e-3)
"""`run_experiment`'s optimiser (on top of `tasks.training.SCRATCH`): AdamW, because on one CPU thread with rows of
~20 tokens Muon's orthogonalisation costs more than the forward and backward pass (0.37 s vs 0.23 s a step for
4 x 256), and a time budget then buys 2.6x fewer steps."""


def train_model(out: str | os.PathLike, arm: str = "plain", per_subset: int = 100, seed: int = 0, layers: int = 4,
                width: int = 256, resume: bool = False, overwrite: bool = False, progress: bool = True,
                **overrides: Any):
    """Train a fresh model in `out` on `make_facts(per_subset, seed)` written as the `arm` says (see `ARMS`;
    "bico" trains with `objective="bico"`). Settings default to `EXPERIMENT` (AdamW 3e-3); `overrides` are
    training settings (`time=240`, `steps=`, `lr=`, ...). Returns the `FinetuneResult`; `evaluate_model(out)`
    scores the model on the held-out templates in both directions."""
    from decoderlab.tasks.training import Shape, train_on_task

    if arm not in ARMS:
        raise UserError(f"unknown reversal arm {arm!r}; use one of {list(ARMS)}")
    if per_subset < 1:
        raise UserError(f"per_subset must be at least 1, got {per_subset}")
    facts = make_facts(per_subset, seed)
    info = {"task": "reversal", "arm": arm, "per_subset": per_subset}
    settings = {**EXPERIMENT, "objective": "bico" if arm == "bico" else "next", **overrides}
    return train_on_task(out, info, None if resume else write_data(facts, arm, seed), word_tokenizer(),
                         Shape(layers, width, 64), resume=resume, overwrite=overwrite, progress=progress,
                         seed=seed, **settings)


def evaluate_model(run: str | os.PathLike, rank: bool = True, rank_templates: int | None = 1) -> ReversalScore:
    """Score a `train_model` run on the facts it was trained on (`evaluate`, held-out templates)."""
    from decoderlab.checkpoint import load as load_model
    from decoderlab.tasks.training import TASK_FOLDER, task_info
    from decoderlab.tokenizer import Tokenizer

    info = task_info(run)
    if info.get("task") != "reversal":
        raise UserError(f"{run} was trained on the {info.get('task')!r} task, not reversal")
    facts = read_facts(Path(run) / TASK_FOLDER / "data" / "facts.jsonl")
    model = load_model(run, pack=False)
    return evaluate(model, Tokenizer.from_folder(run), facts, rank=rank, rank_templates=rank_templates)


def run_experiment(out_dir: str | os.PathLike, arms: Sequence[str] = ARMS, time: float | None = 240.0,
                   steps: int | None = None, per_subset: int = 100, layers: int = 4, width: int = 256,
                   seed: int = 0, progress: bool = False, overwrite: bool = True,
                   **overrides: Any) -> list[dict[str, Any]]:
    """Train one fresh model per arm on the same `per_subset` x 3 facts with the same budget (`time` seconds or
    `steps`), score each on the held-out templates, and return the table rows: one dict per (arm, subset,
    direction) with exact match, top-1 / top-5, mean rank and the chance baselines. Each run is in
    `out_dir/<arm>`; `overrides` are `FinetuneConfig` fields (lr=, batch_size=, ...)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise UserError(f"unknown reversal arms {unknown}; use some of {list(ARMS)}")
    rows = []
    for arm in arms:
        out = Path(out_dir) / arm
        budget = {"time": time} if steps is None else {"steps": steps}
        result = train_model(out, arm, per_subset=per_subset, seed=seed, layers=layers, width=width,
                             overwrite=overwrite, progress=progress, **budget, **overrides)
        score = evaluate_model(out)
        for g in score.groups:
            rows.append({"arm": arm, "subset": g.subset, "direction": g.direction, "trained": g.trained,
                         "exact": g.exact, "top1": g.top1, "top5": g.top5, "mean_rank": g.mean_rank,
                         "chance_exact": g.chance_exact, "chance_rank": g.chance_rank, "steps": result.steps,
                         "val_loss": result.val_loss})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """`run_experiment`'s rows as one aligned text table."""
    head = (f"{'arm':<8} {'subset':<6} {'asked':<8} {'trained':<7} {'exact':>6} {'top1':>6} {'top5':>6} "
            f"{'rank':>6} {'chance rank':>11}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['arm']:<8} {r['subset']:<6} {r['direction']:<8} {'yes' if r['trained'] else 'NO':<7} "
                     f"{r['exact']:>6.1%} {r['top1']:>6.1%} {r['top5']:>6.1%} {r['mean_rank']:>6.1f} "
                     f"{r['chance_rank']:>11.1f}")
    return "\n".join(lines)
