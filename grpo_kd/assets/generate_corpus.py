"""Generator of the built-in tiny corpus (`builtin_corpus.txt`): varied, original, simple sentences.

The text is written for the tiny models of the tests and the demo: it needs nothing outside the machine, it is
learnable in seconds (templates with a small vocabulary), and it carries every Faroese letter in both cases
(ð ø á í ó ú ý æ, and capitals through upper-cased headlines). It mixes Faroese and English description
sentences, number facts ("Hvat er 3 og 4? Tað er sjey.") and order facts (days, counting), so that a prompt made
of the first words of a line has a checkable continuation. Regenerate with

    python grpo_kd/assets/generate_corpus.py > grpo_kd/assets/builtin_corpus.txt

A test checks that the shipped file equals this generator's output.
"""

from __future__ import annotations

import random
import sys

NUMBERS_FO = [
    "null", "eitt", "tvey", "trý", "fýra", "fimm", "seks", "sjey", "átta", "níggju", "tíggju",
    "ellivu", "tólv", "trettan", "fjúrtan", "fimtan", "sekstan", "seytjan", "átjan", "nítjan", "tjúgu",
]
NUMBERS_EN = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]
DAYS_FO = ["mánadagur", "týsdagur", "mikudagur", "hósdagur", "fríggjadagur", "leygardagur", "sunnudagur"]
DAYS_FO_ACC = [day[:-2] for day in DAYS_FO]  # after "eftir": mánadag, týsdag, ...
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

SUBJECTS_FO = [
    "Drongurin", "Gentan", "Fiskimaðurin", "Lærarin", "Bóndin", "Konan", "Maðurin", "Barnið", "Omman",
    "Pápin", "Ólavur", "Ása", "Ívar", "Úlvur", "Øssur", "Sæunn", "Rógvi", "Brynhild",
]
VERBS_FO = ["sær", "keypir", "hevur", "finnur", "ber", "málar", "tekur", "selur", "vaskar", "goymir"]
OBJECTS_FO = [
    "ein bát", "eitt hús", "ein hund", "ein fisk", "eina bók", "eitt skip", "ein stól", "eina rós",
    "eitt fjøður", "ein seyð", "eina kúgv", "eitt bræv", "ein stein", "eina køku",
]
PLACES_FO = [
    "í Tórshavn", "á bygdini", "við sjóvarmálan", "í Klaksvík", "úti á havinum", "heima", "í Gøtu",
    "í Vági", "á Suðuroy", "uppi á fjallinum", "niðri við havnina", "í Hoyvík", "á Eiði", "í Sørvági",
]
TIMES_FO = ["í dag", "í gjár", "um morgunin", "á kvøldi", "hvønn dag", "í summar", "í vetur", "um náttina"]
WEATHER_FO = ["gott veður", "regn", "kavi", "mjørki", "stormur", "sólskin", "hvassur vindur", "kalt", "lýtt"]
COLOURS_FO = {"havið": "blátt", "grasið": "grønt", "kavin": "hvítur", "náttin": "myrk", "sólin": "gul",
              "blóðið": "reytt", "fjallið": "grátt", "rósin": "reyð"}

SUBJECTS_EN = ["The boy", "The girl", "The fisher", "The teacher", "The farmer", "The old woman", "A child",
               "My father", "Our neighbour", "The captain", "The baker", "A sailor"]
VERBS_EN = ["sees", "buys", "has", "finds", "carries", "paints", "takes", "sells", "washes", "keeps"]
OBJECTS_EN = ["a boat", "a house", "a dog", "a fish", "a book", "a ship", "a chair", "a rose", "a sheep",
              "a cow", "a letter", "a stone", "a cake", "a red coat"]
PLACES_EN = ["in the harbour", "in the village", "by the sea", "on the mountain", "at home", "in town",
             "on the island", "near the church", "under the bridge", "in the garden"]
TIMES_EN = ["today", "yesterday", "in the morning", "in the evening", "every day", "in summer", "in winter"]
COLOURS_EN = {"the sea": "blue", "the grass": "green", "the snow": "white", "the night": "dark",
              "the sun": "yellow", "the blood": "red", "the mountain": "grey", "the rose": "red"}


def _sentence_fo(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"{rng.choice(SUBJECTS_FO)} {rng.choice(VERBS_FO)} {rng.choice(OBJECTS_FO)} {rng.choice(PLACES_FO)}."
    if kind == 1:
        return f"{rng.choice(TIMES_FO).capitalize()} er {rng.choice(WEATHER_FO)} {rng.choice(PLACES_FO)}."
    if kind == 2:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"Hvat er {a} og {b}? Tað er {NUMBERS_FO[a + b]}."
    if kind == 3:
        i = rng.randrange(7)
        return f"Eftir {DAYS_FO_ACC[i]} kemur {DAYS_FO[(i + 1) % 7]}."
    if kind == 4:
        thing = rng.choice(sorted(COLOURS_FO))
        return f"Hvussu er {thing} á litin? {thing.capitalize()} er {COLOURS_FO[thing]}."
    n = rng.randrange(1, 17)
    return "Vit telja: " + ", ".join(NUMBERS_FO[n:n + 4]) + "."


def _sentence_en(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.choice(SUBJECTS_EN)} {rng.choice(VERBS_EN)} {rng.choice(OBJECTS_EN)} {rng.choice(PLACES_EN)}."
    if kind == 1:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"What is {a} plus {b}? It is {NUMBERS_EN[a + b]}."
    if kind == 2:
        i = rng.randrange(7)
        return f"After {DAYS_EN[i]} comes {DAYS_EN[(i + 1) % 7]}."
    if kind == 3:
        thing = rng.choice(sorted(COLOURS_EN))
        return f"What colour is {thing}? {thing.capitalize()} is {COLOURS_EN[thing]}."
    return f"{rng.choice(TIMES_EN).capitalize()} {rng.choice(SUBJECTS_EN).lower()} {rng.choice(VERBS_EN)} {rng.choice(OBJECTS_EN)}."


def generate_lines(n: int = 3000, seed: int = 2024) -> list[str]:
    """`n` sentences, about two thirds Faroese, one in twenty an upper-cased Faroese headline."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.05:
            lines.append("TÍÐINDI: " + _sentence_fo(rng).upper())
        elif roll < 0.67:
            lines.append(_sentence_fo(rng))
        else:
            lines.append(_sentence_en(rng))
    return lines


if __name__ == "__main__":
    sys.stdout.write("\n".join(generate_lines()) + "\n")
