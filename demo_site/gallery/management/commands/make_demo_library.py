"""manage.py make_demo_library DIR: draw a small offline library of synthetic "food" pictures.

The project may not ship third-party photos, and the demo must run without internet, so the
default demo library is drawn here: plates of soups, salads, berries, pancakes, pizza, lemons...
with a manifest in the import_library format. They are drawings, not photos; with a real photo
library set IMAGETAGS_DEMO_LIBRARY=/path/manifest.jsonl instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256

# name: (tags, drawing function name, colour range)
DISHES: dict[str, dict[str, Any]] = {
    "tomato soup": {
        "tags": ["soup", "tomato", "red", "bowl"],
        "draw": "soup",
        "rgb": (200, 40, 30),
    },
    "pea soup": {"tags": ["soup", "pea", "green", "bowl"], "draw": "soup", "rgb": (110, 170, 50)},
    "blueberries": {
        "tags": ["berries", "blueberry", "fruit", "blue"],
        "draw": "berries",
        "rgb": (40, 50, 140),
    },
    "raspberries": {
        "tags": ["berries", "raspberry", "fruit", "red"],
        "draw": "berries",
        "rgb": (200, 30, 80),
    },
    "pancakes": {
        "tags": ["pancakes", "breakfast", "sweet"],
        "draw": "stack",
        "rgb": (200, 150, 80),
    },
    "pizza": {"tags": ["pizza", "cheese", "italian"], "draw": "pizza", "rgb": (230, 190, 90)},
    "lemons": {
        "tags": ["lemon", "fruit", "yellow", "citrus"],
        "draw": "ovals",
        "rgb": (240, 220, 40),
    },
    "salad": {
        "tags": ["salad", "vegetables", "healthy", "green"],
        "draw": "leaves",
        "rgb": (70, 150, 60),
    },
}


def _jitter(
    rgb: tuple[int, int, int], rng: random.Random, amount: int = 25
) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def draw_dish(kind: str, rgb: tuple[int, int, int], rng: random.Random) -> Image.Image:
    table = _jitter((150, 110, 80), rng, 40)
    image = Image.new("RGB", (SIZE, SIZE), table)
    draw = ImageDraw.Draw(image)
    cx, cy = SIZE // 2 + rng.randint(-20, 20), SIZE // 2 + rng.randint(-20, 20)
    plate = rng.randint(90, 115)
    draw.ellipse(
        (cx - plate, cy - plate, cx + plate, cy + plate), fill=_jitter((240, 240, 235), rng, 10)
    )
    if kind == "soup":
        r = plate - 18
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rgb, rng))
        for _ in range(6):
            x, y = cx + rng.randint(-r // 2, r // 2), cy + rng.randint(-r // 2, r // 2)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=_jitter((235, 235, 220), rng))
    elif kind == "berries":
        for _ in range(rng.randint(25, 40)):
            x, y = cx + rng.randint(-70, 70), cy + rng.randint(-70, 70)
            s = rng.randint(7, 11)
            draw.ellipse(
                (x - s, y - s, x + s, y + s), fill=_jitter(rgb, rng, 30), outline=(20, 20, 40)
            )
    elif kind == "stack":
        for i in range(rng.randint(4, 7)):
            y = cy + 40 - i * 14
            draw.ellipse(
                (cx - 80, y - 18, cx + 80, y + 18),
                fill=_jitter(rgb, rng, 15),
                outline=(140, 90, 40),
            )
        draw.rectangle((cx - 12, cy - 55, cx + 12, cy - 40), fill=(250, 240, 170))
    elif kind == "pizza":
        r = plate - 8
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 140, 70))
        draw.ellipse(
            (cx - r + 12, cy - r + 12, cx + r - 12, cy + r - 12), fill=_jitter(rgb, rng, 15)
        )
        for _ in range(rng.randint(8, 14)):
            x, y = cx + rng.randint(-60, 60), cy + rng.randint(-60, 60)
            draw.ellipse((x - 9, y - 9, x + 9, y + 9), fill=_jitter((170, 30, 30), rng, 20))
    elif kind == "ovals":
        for _ in range(rng.randint(3, 6)):
            x, y = cx + rng.randint(-55, 55), cy + rng.randint(-55, 55)
            draw.ellipse(
                (x - 32, y - 22, x + 32, y + 22), fill=_jitter(rgb, rng, 15), outline=(180, 160, 20)
            )
    elif kind == "leaves":
        for _ in range(rng.randint(18, 30)):
            x, y = cx + rng.randint(-75, 75), cy + rng.randint(-75, 75)
            points = [(x + rng.randint(-22, 22), y + rng.randint(-22, 22)) for _ in range(4)]
            draw.polygon(points, fill=_jitter(rgb, rng, 35))
        for _ in range(rng.randint(3, 6)):
            x, y = cx + rng.randint(-60, 60), cy + rng.randint(-60, 60)
            draw.ellipse((x - 8, y - 8, x + 8, y + 8), fill=(210, 40, 40))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


class Command(BaseCommand):
    help = "Draw an offline demo library of synthetic dish pictures with a manifest.jsonl."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("directory", help="Folder to write images/ and manifest.jsonl into.")
        parser.add_argument(
            "--per-dish", type=int, default=12, help="Pictures per dish (default: %(default)s)."
        )
        parser.add_argument(
            "--seed", type=int, default=0, help="Random seed (default: %(default)s)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        root = Path(options["directory"])
        (root / "images").mkdir(parents=True, exist_ok=True)
        rng = random.Random(options["seed"])
        lines = []
        for dish, spec in DISHES.items():
            for i in range(options["per_dish"]):
                name = f"images/{dish.replace(' ', '-')}-{i:02d}.jpg"
                draw_dish(spec["draw"], spec["rgb"], rng).save(root / name, quality=88)
                # Like real users, not everybody tags everything.
                tags = ["food"] + [t for t in spec["tags"] if rng.random() < 0.85]
                lines.append({"path": name, "tags": tags, "post": None, "owner": None})
        manifest = root / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        self.stdout.write(self.style.SUCCESS(f"Wrote {len(lines)} pictures and {manifest}."))
