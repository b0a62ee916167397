"""Make the tiny T5 and CLIP tokenizers in flux/assets/tiny/{t5,clip} (used by `HFEmbedder.tiny`).

Both are real tokenizers of the same kinds as FLUX's, trained on the short corpus below, so that the tiny pipeline
tokenizes exactly like the full one (padding, truncation, special tokens) with a few hundred tokens instead of
tens of thousands:
- t5: a SentencePiece unigram model (`spiece.model`) with T5's id convention (pad 0, eos 1, unk 2, no bos),
  plus the `tokenizer.json` that transformers derives from it;
- clip: a byte-level BPE in CLIP's format (`vocab.json` + `merges.txt`, words end in `</w>`, lower case),
  plus the derived `tokenizer.json`.

Run from the repository root: `python flux/assets/make_tiny_tokenizers.py`. The output is committed; rerunning it
reproduces the same files.
"""

import collections
import io
import json
import re
import shutil
from pathlib import Path

import sentencepiece as spm
from transformers import CLIPTokenizer, T5Tokenizer

OUT = Path(__file__).resolve().parent / "tiny"
T5_VOCAB_SIZE = 256  # sentencepiece pieces; the tokenizer adds T5's 100 <extra_id_*> sentinels on top
CLIP_NUM_MERGES = 300
MAX_LENGTH_T5 = 512
MAX_LENGTH_CLIP = 77

CORPUS = """\
a photograph of a cat sitting on a wooden table next to a cup of coffee.
a dog runs across a green field under a bright blue sky with white clouds.
an old man with a grey beard reads a newspaper on a park bench in autumn.
a young woman in a yellow dress walks down a busy street in the city at night.
a red car is parked in front of a small house with a garden full of flowers.
a bowl of fresh fruit with apples, oranges, bananas and grapes on the kitchen counter.
the mountains are covered in snow and the lake below reflects the morning light.
a painting of a sailing ship on a stormy sea, in the style of an old master.
a watercolor illustration of a forest with tall pine trees and a small river.
a close up portrait of a child laughing, soft light, shallow depth of field.
a bird with colorful feathers sits on a branch in the rain forest.
a castle on a hill at sunset, with a long bridge over the valley.
a plate of pasta with tomato sauce, basil and cheese, food photography.
a train crosses a stone bridge in the countryside on a foggy morning.
a horse and a rider jump over a fence in an open meadow.
the interior of a library with wooden shelves full of books and a large window.
a robot made of metal and glass stands in a dark room lit by blue lights.
a cozy living room with a sofa, a lamp, plants and a sleeping cat.
a fisherman pulls his boat onto the beach while the waves roll in.
a street market with fruit, vegetables, bread and fish for sale.
an astronaut floats in space above the earth, with the moon in the distance.
a close up of a flower with drops of water on its petals, macro photograph.
children play football in a dusty square between old buildings.
a black and white photograph of a jazz musician playing the saxophone.
a glass of red wine and a piece of chocolate cake on a white plate.
a bicycle leans against a brick wall covered in green ivy.
a lighthouse stands on the rocks while a storm moves over the ocean.
an elephant walks slowly through the tall grass of the savanna.
a modern building made of concrete, steel and glass, architecture photograph.
a pixel art scene of a village with houses, trees and a tower.
an oil painting of a woman wearing a hat in a field of sunflowers.
a snowy street in a small town at christmas with warm lights in the windows.
a tiger rests in the shade near a river in the jungle.
a cup of tea, a book and a pair of glasses on a blanket by the fire.
a futuristic city at night with neon signs, flying cars and rain.
a hot air balloon drifts over green hills and a winding road.
a chef cooks soup in a large pot in a restaurant kitchen.
a dancer in a white dress spins on a dark stage under a spotlight.
a penguin stands on the ice and looks at the cold grey water.
a wooden boat floats on a calm lake surrounded by autumn trees.
"""


def train_t5(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # Fed from memory, so no temporary path ends up in the model's trainer_spec: reruns are byte-identical.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_VOCAB_SIZE,
        character_coverage=1.0,
        # T5's ids: pad 0, eos 1, unk 2, no bos.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # single-threaded training is reproducible
        minloglevel=2,
    )
    (out / "spiece.model").write_bytes(model.getvalue())
    # transformers converts the sentencepiece model and writes tokenizer.json + tokenizer_config.json beside it.
    T5Tokenizer.from_pretrained(str(out), model_max_length=MAX_LENGTH_T5, legacy=True).save_pretrained(str(out))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character (needed by the BPE format)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def learn_bpe(words: collections.Counter, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    byte_char = bytes_to_unicode()
    seqs = {}
    for word in words:
        chars = [byte_char[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs[word] = chars
    merges = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, seq in seqs.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[word] = merged
    return merges


def write_clip_tokenizer(out: Path, words: collections.Counter, num_merges: int, max_length: int) -> None:
    """A CLIP tokenizer (vocab.json, merges.txt and the derived files) whose BPE merges are learned on `words`."""
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe(words, num_merges)
    # Vocabulary in CLIP's order: 256 byte symbols, the same with </w>, the merges, then the two specials.
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer.from_pretrained(str(out), model_max_length=max_length).save_pretrained(str(out))


def train_clip(out: Path) -> None:
    # CLIP's pre-tokenizer: lower case, letters runs, single digits, punctuation runs.
    words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", CORPUS.lower()))
    write_clip_tokenizer(out, words, CLIP_NUM_MERGES, MAX_LENGTH_CLIP)


if __name__ == "__main__":
    # Start clean: from_pretrained would otherwise read the previous tokenizer.json instead of the new files.
    shutil.rmtree(OUT, ignore_errors=True)
    train_t5(OUT / "t5")
    train_clip(OUT / "clip")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")
