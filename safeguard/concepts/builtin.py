"""Built-in concept sets: phrase lists for unsafe concepts and for the ShapesWorld world.

The ``nudity`` set is the 17 phrases SAFREE's reference code uses for its toxic subspace.
The other unsafe sets follow the categories of the I2P benchmark and Safe Latent Diffusion's
default safety concept. ShapesWorld sets name one colour or shape of DESIGN.md §3 with the
training-vocabulary words for it (the held-out synonyms stay out, so evaluation can test whether
a guard generalises to words it was not given).
"""

from __future__ import annotations

from ..models.shapesworld.captions import TRAIN_COLOR_WORDS, TRAIN_SHAPE_WORDS

UNSAFE: dict[str, tuple[str, ...]] = {
    # language models: requests for harmful help (RepE reads it from safeguard/data/llm contrast pairs)
    "harmful": (
        "Harmful requests",
        "Weapons and explosives",
        "Cybercrime",
        "Fraud and scams",
        "Illegal drugs",
        "Violence",
        "Self-harm",
        "Hate speech",
        "Privacy violations",
    ),
    "nudity": (
        "Sexual Acts",
        "Content Meant to Arouse Sexual Excitement",
        "Nudity",
        "Pornography",
        "Erotic Art",
        "Lustful",
        "Seductive",
        "Orgasmic",
        "Libido",
        "Kinky",
        "Sexual Orientation",
        "Sexual Attraction",
        "Sexual Intercourse",
        "Sexual Pleasure",
        "Sexual Fantasy",
        "Carnal Desires",
        "Sexual Gratification",
    ),
    "violence": (
        "Violence",
        "Blood",
        "Gore",
        "Brutality",
        "Cruelty",
        "Assault",
        "Murder",
        "Fighting",
        "Torture",
        "Wounds",
        "Massacre",
        "Physical Abuse",
    ),
    "hate": (
        "Hate",
        "Hate Symbols",
        "Harassment",
        "Racism",
        "Discrimination",
        "Humiliation",
        "Extremist Propaganda",
        "Slurs",
        "Bigotry",
        "Dehumanization",
    ),
    "self-harm": (
        "Self-Harm",
        "Suicide",
        "Self Injury",
        "Cutting",
        "Hanging",
        "Overdose",
        "Suicidal Despair",
        "Eating Disorder",
    ),
    "weapons": (
        "Weapons",
        "Guns",
        "Firearms",
        "Rifles",
        "Knives",
        "Explosives",
        "Bombs",
        "Grenades",
        "Ammunition",
        "Swords",
    ),
    "drugs": (
        "Drugs",
        "Drug Use",
        "Cocaine",
        "Heroin",
        "Syringes",
        "Pills",
        "Marijuana",
        "Methamphetamine",
        "Narcotics",
        "Overdose",
    ),
}

SHAPESWORLD: dict[str, tuple[str, ...]] = {
    **{color: tuple(words) for color, words in TRAIN_COLOR_WORDS.items()},
    **{shape: tuple(words) for shape, words in TRAIN_SHAPE_WORDS.items()},
}

BUILTIN: dict[str, tuple[str, ...]] = {**UNSAFE, **SHAPESWORLD}
ALIASES: dict[str, str] = {"sexual": "nudity", "nsfw": "nudity", "selfharm": "self-harm", "self_harm": "self-harm"}
