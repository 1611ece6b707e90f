"""Write the demo's general-knowledge set: the base SmolLM2-135M-Instruct's own greedy answers.

Self-distillation (the model's answers to questions it already handles) is what keeps a small model's
general behaviour while LoRA teaches it a new identity: training on them moves nothing the model did
not already do. Writes every candidate that ended within the token bound; the bundled
src/chattune/assets/data/smollm2-general/general.json keeps those whose fact was right, checked by hand
(its SOURCE.md). Each question is asked under the demo's system prompt (`chattune.demo.DEMO_SYSTEM_PROMPT`),
the one the demo trains under, so the answers are the model's own in the very context they are trained in.
Run once:

    python tools/make_general_answers.py /tmp/candidates.json
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.demo import DEMO_SYSTEM_PROMPT
from chattune.model.resolve import resolve_model_dir

QUESTIONS = [
    "What is the capital of Germany?",
    "What is the capital of Italy?",
    "What is the capital of Spain?",
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
    "How many legs does a spider have?",
    "What is 3 + 5?",
    "What is 10 times 10?",
    "What is the boiling point of water in Celsius?",
    "What gas do plants absorb from the air?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "What is the freezing point of water?",
    "Name three primary colors.",
    "What is the opposite of hot?",
    "Translate 'hello' into French.",
    "What is the tallest mountain in the world?",
    "How many continents are there?",
    "What is the largest ocean on Earth?",
    "What do bees make?",
    "What is photosynthesis?",
    "Give me a synonym for happy.",
    "What is the square root of 16?",
    "What language is spoken in Brazil?",
    "Which planet is known as the Red Planet?",
    "What is the main ingredient of guacamole?",
    "How many hours are in a day?",
    "What is H2O?",
    "Who painted the Mona Lisa?",
    "What is the currency of the United States?",
    "Write a short sentence about the sea.",
    "What is the plural of mouse?",
    "What is the fastest land animal?",
    "How many minutes are in an hour?",
    "What is the capital of Canada?",
    "What shape has three sides?",
    "Give me a tip for sleeping better.",
    "What is the longest river in Africa?",
    "What is 12 divided by 4?",
    "What does a thermometer measure?",
    "What is the capital of the United Kingdom?",
    "What is the capital of Russia?",
    "What is the capital of China?",
    "What is the capital of Egypt?",
    "What is the capital of Australia?",
    "How many legs does a dog have?",
    "How many wheels does a bicycle have?",
    "What is the opposite of big?",
    "What is the chemical symbol for oxygen?",
    "What is the chemical symbol for iron?",
    "What is the main gas in the air we breathe?",
    "What is 100 divided by 10?",
    "What is 3 + 4?",
    "What is 1 + 1?",
    "What is 7 + 2?",
    "What is 3 times 3?",
    "What is 6 + 6?",
    "What is 2 + 3?",
]


def main(out: str) -> None:
    d = resolve_model_dir("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template(
            [{"role": "system", "content": DEMO_SYSTEM_PROMPT}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out_ids = model.generate(**ids, max_new_tokens=64, do_sample=False)[0][ids["input_ids"].shape[1] :]
        if (
            out_ids[-1].item() != eot
        ):  # only complete answers: a cut-off one would teach stopping mid-sentence
            print(f"skipped (no end of turn in 64 tokens): {q}", file=sys.stderr)
            continue
        rows.append({"instruction": q, "input": "", "output": tok.decode(out_ids[:-1]).strip()})
        print(q, "->", rows[-1]["output"], file=sys.stderr)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    print(f"{len(rows)} of {len(QUESTIONS)} answers written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
