"""Prompted self-generated text for run B6 of docs/research/compress-experiments.md: does better generated text
help recovery?

The default (instruct) model answers chat prompts built from 8 instruction forms x 60 everyday topics
(seeded choice), sampled at temperature 0.8, top-p 0.95, 256 new tokens each, batches of 32. The
text is rewritten to OUT.txt after every batch.
Run: python docs/research/generate_prompted.py OUT.txt TOKENS [THREADS]   (40,000 tokens: 12 min on 1 thread)
ARCHIVED RECORD, kept next to its log; no test runs it (the text it wrote was measured once and not adopted).
"""

import random
import sys
import time

import torch

from truedepth.core.loading import load

out_path, target = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
model, tok = load("default", dtype=torch.float32, device="cpu")
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
topics = [
    "the history of Rome",
    "how vaccines work",
    "baking bread",
    "the stock market",
    "operating systems",
    "the French Revolution",
    "photosynthesis",
    "jazz music",
    "chess strategy",
    "learning a new language",
    "the internet",
    "black holes",
    "gardening in spring",
    "a job interview",
    "climate change",
    "the printing press",
    "computer programming",
    "the human heart",
    "football tactics",
    "medieval castles",
    "electric cars",
    "poetry",
    "a trip to Japan",
    "the water cycle",
    "democracy",
    "email etiquette",
    "ancient Egypt",
    "machine learning",
    "a mystery in a small town",
    "the ocean floor",
    "friendship",
    "how a bank works",
    "the Moon landing",
    "open source software",
    "nutrition",
    "the Renaissance",
    "earthquakes",
    "a cat and a dog",
    "video games",
    "the immune system",
    "railways",
    "philosophy of mind",
    "coffee",
    "the Cold War",
    "mathematics",
    "hackers",
    "a wedding",
    "volcanoes",
    "copyright law",
    "birds",
    "the telephone",
    "Shakespeare",
    "a rainy day",
    "Linux",
    "economics of trade",
    "dinosaurs",
    "a science fair",
    "the Olympic Games",
    "cryptography",
    "a haunted house",
]
forms = [
    "Write a short essay about {}.",
    "Explain {} to a curious student.",
    "Tell me a story involving {}.",
    "Write an encyclopedia article about {}.",
    "Describe {} in detail.",
    "What are common misconceptions about {}?",
    "Write a letter to a friend about {}.",
    "Give a detailed history of {}.",
]
rng = random.Random(0)
out, n, t0, part = [], 0, time.time(), 0
while n < target:
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": rng.choice(forms).format(rng.choice(topics))}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for _ in range(32)
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(part)
    with torch.no_grad():
        g = model.generate(
            **enc,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=256,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    for row in g[:, enc["input_ids"].shape[1] :]:
        text = tok.decode(row, skip_special_tokens=True).strip()
        n += len(tok(text, add_special_tokens=False)["input_ids"])
        out.append(text)
    part += 1
    print(f"{n} tokens {time.time() - t0:.0f}s", flush=True)
    open(out_path, "w", encoding="utf-8").write("\n\n".join(out))
