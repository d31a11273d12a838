"""A synthetic dataset the package makes itself: coloured shapes rendered with Pillow, in LLaVA's JSON format.

Each image holds one to three copies of one shape in one colour and size. Stage 1 gets a caption per image; stage 2
gets questions of five types (colour, shape, count, position, yes/no) with one-or-two-word answers, so that
exact-match accuracy per type, against the chance level beside it, shows what a model has learned. Everything is
deterministic from the seed. The held-out split shows layouts (colour, shape, size and places together) that no
training image shows: a fixed tenth of all layouts, chosen by a hash, is reserved for it.
"""

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .files import folder_replaced_when_done

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 170),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
COUNTS = ("one", "two", "three")
# Position is asked only of single shapes, whose quadrant is well defined.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (235, 235, 235)
GRID = 4  # cells per side of an image
QUESTION_TYPES = ("colour", "shape", "count", "position", "yes/no")
# What a model that ignores the image gets right when it guesses uniformly among the possible answers.
CHANCE = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "count": 1 / len(COUNTS),
    "position": 1 / len(POSITIONS),
    "yes/no": 1 / 2,
}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    count: int
    position: str | None  # the quadrant of a single shape; None for two or three
    cells: tuple[tuple[int, int], ...]  # grid cell (x, y) of each shape's top-left corner

    @property
    def heldout(self) -> bool:
        """Whether this layout is reserved for the held-out split (a stable hash, the same on every machine)."""
        return zlib.crc32(repr((self.colour, self.shape, self.size, sorted(self.cells))).encode()) % 10 == 0


@dataclass(frozen=True)
class DemoDataset:
    """Where `make_demo_dataset` wrote its files."""

    image_folder: Path
    captions: Path  # stage 1: LLaVA JSON, one caption per training image
    instruct: Path  # stage 2: LLaVA JSON, single- and multi-turn questions about the training images
    heldout: Path  # evaluation: JSON list of {"id", "image", "type", "question", "answer"}

    def training_texts(self) -> list[str]:
        """Every turn of the training conversations: what the demo's tokenizer is trained on."""
        return [
            turn["value"]
            for path in (self.captions, self.instruct)
            for sample in json.loads(path.read_text())
            for turn in sample["conversations"]
        ]


def _plural(shape, count):
    return shape if count == 1 else shape + "s"


def random_scene(rng: random.Random) -> Scene:
    """A random scene on a 4 x 4 grid of cells: a small shape fills one cell, a large one the 2 x 2 cells of a
    quadrant; a single shape lies in the quadrant its position names."""
    count = rng.randint(1, len(COUNTS))
    size = rng.choice(SIZES)
    position = rng.choice(POSITIONS) if count == 1 else None
    half = GRID // 2
    quadrants = [(x, y) for y in (0, half) for x in (0, half)]  # in the order of POSITIONS
    if size == "large":
        cells = [quadrants[POSITIONS.index(position)]] if position else rng.sample(quadrants, count)
    elif position:
        x0, y0 = quadrants[POSITIONS.index(position)]
        cells = [(x0 + rng.randrange(half), y0 + rng.randrange(half))]
    else:
        cells = rng.sample([(x, y) for y in range(GRID) for x in range(GRID)], count)
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), size, count, position, tuple(cells))


def _draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw `scene` on a light-grey canvas; the shapes of a scene never touch.

    The demo model's patches are the grid's cells. Its vision tower is random and frozen (the recipe freezes it, and
    the demo has no pretrained CLIP); a random patch embedding keeps one outline apart from another only when a
    shape sits in its patches the same way every time, hence shapes on the grid rather than anywhere.
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size // GRID
    span = 1 if scene.size == "small" else 2  # cells per side
    radius = round(cell * span * 0.42)
    for x, y in scene.cells:
        centre_x, centre_y = cell * x + cell * span // 2, cell * y + cell * span // 2
        _draw_shape(draw, scene.shape, centre_x, centre_y, radius, COLOURS[scene.colour])
    return image


def caption(scene: Scene) -> str:
    text = f"{COUNTS[scene.count - 1]} {scene.size} {scene.colour} {_plural(scene.shape, scene.count)}"
    return text + (f" at the {scene.position}." if scene.position else ".")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every type that applies to `scene`."""
    shapes = "shape" if scene.count == 1 else "shapes"
    qa = [
        ("colour", f"What colour {'is the' if scene.count == 1 else 'are the'} {shapes}?", scene.colour),
        ("shape", "What shape is in the image?", scene.shape),
        ("count", "How many shapes are there?", COUNTS[scene.count - 1]),
    ]
    if scene.position:
        qa.append(("position", f"Where is the {scene.colour} {scene.shape}?", scene.position))
    # Yes/no asks about the size, which no other question does. Questions that name a colour or a shape to check
    # ("Is the shape red?") stayed at chance for the demo's tiny model within its budget: it answered "no" to all.
    verb = "Is the" if scene.count == 1 else "Are the"
    qa.append(("yes/no", f"{verb} {shapes} large?", "yes" if scene.size == "large" else "no"))
    return qa


DATASET_FILES = ("images", "captions.json", "instruct.json", "heldout.json")


def _write_json(path: Path, data):
    path.write_text(json.dumps(data, indent=1))


def _save_image(image: Image.Image, path: Path):
    image.save(path, format="PNG")


def make_demo_dataset(
    output_dir,
    num_train_images: int = 3000,
    num_heldout_images: int = 400,
    seed: int = 0,
    image_size: int = 64,
) -> DemoDataset:
    """Render the demo images into `output_dir/images` and write the three JSON files beside them.

    Stage 2 gets every applicable question type for each training image, as one multi-turn conversation for half
    the images and as separate single-turn samples for the other half. The held-out split draws from a random stream
    of its own (`seed` + 1) and only from the reserved layouts (`Scene.heldout`), which training never shows.

    The dataset is written in a folder beside `output_dir` that replaces it when complete: an interrupted run leaves
    the previous dataset whole (rewritten in place, its images could be the new run's and its questions the old's).
    So `output_dir` must hold nothing but a dataset.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir} is not a folder: the demo dataset is a folder")
    foreign = (
        sorted(p.name for p in output_dir.iterdir() if p.name not in DATASET_FILES) if output_dir.exists() else []
    )
    if foreign:
        raise ValueError(
            f"{output_dir} holds files that are not the demo dataset's ({', '.join(foreign[:5])}): writing the dataset "
            "replaces the whole folder; give another one"
        )
    with folder_replaced_when_done(output_dir) as staging:
        _write_dataset(staging, num_train_images, num_heldout_images, seed, image_size)
    return DemoDataset(
        output_dir / "images", output_dir / "captions.json", output_dir / "instruct.json", output_dir / "heldout.json"
    )


def _write_dataset(output_dir: Path, num_train_images, num_heldout_images, seed, image_size):
    image_folder = output_dir / "images"
    image_folder.mkdir()

    captions, instruct, heldout = [], [], []
    for split, num_images, split_seed in (
        ("train", num_train_images, seed),
        ("heldout", num_heldout_images, seed + 1),
    ):
        rng = random.Random(split_seed)
        for index in range(num_images):
            scene = random_scene(rng)
            while scene.heldout != (split == "heldout"):
                scene = random_scene(rng)
            name = f"{split}_{index:05d}.png"
            _save_image(render_scene(scene, image_size), image_folder / name)
            qa = questions(scene, rng)
            if split == "heldout":
                heldout += [
                    {"id": f"{split}_{index}_{kind}", "image": name, "type": kind, "question": q, "answer": a}
                    for kind, q, a in qa
                ]
                continue
            captions.append(
                {
                    "id": f"caption_{index}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the image briefly."},
                        {"from": "gpt", "value": caption(scene)},
                    ],
                }
            )
            rng.shuffle(qa)
            if index % 2:
                turns = []
                for turn, (_, q, a) in enumerate(qa):
                    turns += [
                        {"from": "human", "value": f"<image>\n{q}" if turn == 0 else q},
                        {"from": "gpt", "value": a},
                    ]
                instruct.append({"id": f"qa_{index}", "image": name, "conversations": turns})
            else:
                instruct += [
                    {
                        "id": f"qa_{index}_{kind}",
                        "image": name,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                    }
                    for kind, q, a in qa
                ]

    _write_json(output_dir / "captions.json", captions)
    _write_json(output_dir / "instruct.json", instruct)
    _write_json(output_dir / "heldout.json", heldout)


__all__ = ["CHANCE", "QUESTION_TYPES", "DemoDataset", "caption", "make_demo_dataset", "questions", "render_scene"]
