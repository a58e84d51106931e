"""bench/shapeworld.py: scene generator, renderer and ShapeEval (python -m pytest tests/test_shapeworld.py -q -s)."""

import itertools
import re
import time
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

import model

from bench.shapeworld import (
    BACKGROUND,
    BORDER,
    COLORS,
    GAP,
    MAX_SIZE,
    MIN_SIZE,
    NUMBER_WORDS,
    PALETTE,
    POSITION_MARGIN,
    SHAPES,
    TASKS,
    Obj,
    Scene,
    caption_for,
    caption_vocabulary,
    components,
    detect,
    evaluate,
    make_scene,
    make_scenes,
    relations,
    render,
    score,
)


def scene(task: str, objects: list[Obj], relation: str | None = None) -> Scene:
    return Scene(task, caption_for(task, objects, relation), objects, relation)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur, edge-padded: uint8 [N, H, W, 3] -> float [N, H, W, 3]."""
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k[i] * x[:, i : i + h] for i in range(2 * r + 1))
    return sum(k[i] * x[:, :, i : i + w] for i in range(2 * r + 1))


def degrade(images: np.ndarray, seed: int, sigma: float = 1.0, noise: float = 8.0) -> np.ndarray:
    """Roughly what an 8x autoencoder does to 64x64 renders: soft edges, a little noise."""
    rng = np.random.default_rng(seed)
    out = blur(images, sigma) + rng.normal(0, noise, images.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def world():
    scenes = make_scenes(600, seed=0)
    return scenes, np.stack([render(s) for s in scenes])


# ---------------------------------------------------------------------------------------------------------------
# The world


def test_make_scenes_deterministic_by_seed():
    a, b, c = make_scenes(60, seed=3), make_scenes(60, seed=3), make_scenes(60, seed=4)
    assert a == b
    assert a != c
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a, b))


def test_every_task_appears_in_equal_shares():
    scenes = make_scenes(60, seed=0)
    assert [s.task for s in scenes[:6]] == list(TASKS)
    assert all(sum(s.task == t for s in scenes) == 10 for t in TASKS)
    assert make_scenes(5, seed=0, tasks=("counting",))[4].task == "counting"
    rng = np.random.default_rng(0)
    assert {make_scene(rng).task for _ in range(200)} == set(TASKS)


def parse(caption: str) -> tuple[list[tuple[str | None, str]], str | None]:
    """Caption -> ([(colour or None, shape)], relation), written independently of the generator."""
    noun = r"an? (?:(red|orange|yellow|green|blue|purple|white|black) )?(circle|square|triangle)"
    if m := re.fullmatch(rf"a photo of {noun}", caption):
        return [m.groups()], None
    if m := re.fullmatch(rf"a photo of {noun} and {noun}", caption):
        return [m.groups()[:2], m.groups()[2:]], None
    if m := re.fullmatch(rf"a photo of {noun} (left of|right of|above|below) {noun}", caption):
        return [m.groups()[:2], m.groups()[3:]], m.group(3)
    if m := re.fullmatch(r"a photo of (two|three|four) (circle|square|triangle)s", caption):
        n = {v: k for k, v in NUMBER_WORDS.items()}[m.group(1)]
        return [(None, m.group(2))] * n, None
    raise AssertionError(f"unparseable caption {caption!r}")


def test_captions_match_scenes():
    vocabulary = set(caption_vocabulary())
    for s in make_scenes(600, seed=1):
        nouns, relation = parse(s.caption)
        assert len(nouns) == len(s.objects), s
        assert relation == s.relation
        with_color = s.task in ("colors", "color_attr")
        for (color, shape), obj in zip(nouns, s.objects):
            assert shape == obj.shape, s
            assert color == (obj.color if with_color else None), s
        assert set(s.caption.split()) <= vocabulary
        assert (" an " in s.caption) == (" an orange " in s.caption)
        if s.task in ("two_object", "position", "color_attr"):
            assert s.objects[0].shape != s.objects[1].shape
        if s.task == "color_attr":
            assert s.objects[0].color != s.objects[1].color
        if s.task == "counting":
            assert 2 <= len(s.objects) <= 4 and len({o.shape for o in s.objects}) == 1
    assert caption_for("colors", [Obj("circle", "orange", 0.5, 0.5, 0.2)]) == "a photo of an orange circle"


def test_caption_vocabulary():
    vocabulary = caption_vocabulary()
    # a an photo of and + 8 colours + 3 shapes and their plurals + two three four + left right above below
    assert len(vocabulary) == len(set(vocabulary)) == 26
    assert {"an", "left", "of", "below", "triangles", "four", "orange"} <= set(vocabulary)


def test_objects_inside_apart_and_sized():
    for s in make_scenes(600, seed=2):
        assert 1 <= len(s.objects) <= 4
        for o in s.objects:
            assert MIN_SIZE <= o.size <= MAX_SIZE
            x0, y0, x1, y1 = o.box()
            assert min(x0, y0) >= BORDER - 1e-9 and max(x1, y1) <= 1 - BORDER + 1e-9
        for a, b in itertools.combinations(s.objects, 2):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box(), b.box()
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= GAP - 1e-9, s


def test_position_scenes_are_unambiguous():
    for s in make_scenes(300, seed=3, tasks=("position",)):
        a, b = s.objects[0].box(), s.objects[1].box()
        assert s.relation in relations(a, b, 2 * POSITION_MARGIN)
        assert relations(a, b, 0.0) == {s.relation}


def test_relations_rule():
    box = lambda cx, cy, size=0.2: (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    assert relations(box(0.2, 0.5), box(0.7, 0.5)) == {"left of"}
    assert relations(box(0.7, 0.5), box(0.2, 0.5)) == {"right of"}
    assert relations(box(0.5, 0.2), box(0.5, 0.7)) == {"above"}
    assert relations(box(0.5, 0.8), box(0.5, 0.3)) == {"below"}
    assert relations(box(0.2, 0.2), box(0.7, 0.7)) == {"left of", "above"}  # diagonal: both
    assert relations(box(0.485, 0.5), box(0.515, 0.5)) == set()  # offset 0.03 < margin 0.1 x (0.2 + 0.2)
    assert relations(box(0.45, 0.5), box(0.55, 0.5)) == {"left of"}


def test_render_and_grid():
    s = scene("single_object", [Obj("square", "red", 0.5, 0.5, 0.25)])
    image = render(s)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (128, 128, 128) and tuple(image[32, 32]) == (220, 20, 60)
    assert render(s, 128).shape == (128, 128, 3)
    g = model.image_grid(np.stack([image] * 5), columns=3, gap=2)
    assert g.shape == (2 * 64 + 2, 3 * 64 + 4, 3)
    assert np.array_equal(g[66:130, 66:130], image) and (g[64:66] == 255).all() and (g[66:, 130:] == 255).all()


# ---------------------------------------------------------------------------------------------------------------
# ShapeEval


def flood_fill_components(ids: np.ndarray, background: int) -> set[frozenset]:
    """Reference labelling by BFS: the set of components, each a frozenset of flat pixel indices."""
    h, w = ids.shape
    seen, out = np.zeros((h, w), bool), set()
    for y, x in itertools.product(range(h), range(w)):
        if seen[y, x] or ids[y, x] == background:
            continue
        seen[y, x], queue, comp = True, deque([(y, x)]), set()
        while queue:
            cy, cx = queue.popleft()
            comp.add(cy * w + cx)
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and ids[ny, nx] == ids[cy, cx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.add(frozenset(comp))
    return out


def test_components_match_flood_fill():
    rng = np.random.default_rng(0)
    background = len(COLORS)
    for n_ids in (2, 3, 9):
        ids = rng.integers(0, n_ids, (20, 23)).astype(np.uint8)
        ids[ids == n_ids - 1] = background
        roots = components(ids).ravel()
        fg = np.nonzero(ids.ravel() != background)[0]
        ours = {frozenset(fg[roots[fg] == r].tolist()) for r in np.unique(roots[fg])}
        assert ours == flood_fill_components(ids, background)
    spiral = np.full((15, 15), background, np.uint8)  # one long winding component
    spiral[1::4, 1:-1] = 0
    spiral[1:-1, 13] = 0
    spiral[3::4, 1] = 0
    spiral[:, 0] = background
    spiral[3:6, 13] = background
    assert len({r for r in components(spiral)[spiral != background]}) == len(flood_fill_components(spiral, background))


def test_ground_truth_scores_near_one(world):
    scenes, images = world
    start = time.perf_counter()
    result = score(images, scenes)
    seconds = time.perf_counter() - start
    print(f"\nground truth: {result}; {1000 * seconds / len(scenes):.2f} ms per 64x64 image")
    assert result["n"] == 600 and set(result["per_task"]) == set(TASKS)
    assert result["overall"] >= 0.98
    assert min(result["per_task"].values()) >= 0.95


def test_degraded_renders_still_score(world):
    scenes, images = world
    result = score(degrade(images, seed=0, sigma=1.0, noise=8.0), scenes)
    print(f"\nblur sigma 1 + noise std 8: {result}")
    assert result["overall"] >= 0.9
    assert min(result["per_task"].values()) >= 0.85


def test_noise_scores_near_zero(world):
    scenes, images = world
    rng = np.random.default_rng(0)
    uniform = score(rng.integers(0, 256, images.shape, dtype=np.uint8), scenes)
    coarse = rng.integers(0, 256, (len(scenes), 6, 6, 3), dtype=np.uint8)  # smooth random colour fields
    fields = np.stack([np.asarray(Image.fromarray(c).resize((64, 64), Image.BICUBIC)) for c in coarse])
    blobs = score(fields, scenes)
    print(f"\nuniform noise: {uniform}\nsmooth blobs: {blobs}")
    assert uniform["overall"] <= 0.05
    assert blobs["overall"] <= 0.05
    assert score(np.full_like(images, 128), scenes)["overall"] == 0.0  # empty background


def test_captions_of_other_scenes_score_at_chance(world):
    scenes, images = world
    shuffled = score(np.roll(images, 6, axis=0), scenes)  # each image judged against another scene of its task
    assert shuffled["per_task"]["color_attr"] <= 0.05
    assert shuffled["overall"] <= 0.3


def test_wrong_color():
    asked = scene("colors", [Obj("square", "yellow", 0.5, 0.5, 0.3)])
    assert evaluate(render(asked), asked) == (True, "")
    ok, reason = evaluate(render(scene("colors", [Obj("square", "blue", 0.5, 0.5, 0.3)])), asked)
    assert not ok and "yellow" in reason and "blue" in reason


def test_orange_and_yellow_are_told_apart():
    for color, other in (("orange", "yellow"), ("yellow", "orange"), ("red", "orange"), ("orange", "red")):
        s = scene("colors", [Obj("circle", color, 0.3, 0.4, 0.25)])
        images = np.stack([render(s)] * 4)
        for image in (images[0], *degrade(images, seed=1)):
            assert [(d.shape, d.color) for d in detect(image)] == [("circle", color)]
            assert evaluate(image, s)[0]
            assert not evaluate(image, scene("colors", [Obj("circle", other, 0.3, 0.4, 0.25)]))[0]


def test_non_shapes_are_not_detected():
    """Palette-coloured patches on the background that are none of the three shapes (as drawn in this world)."""
    blue = PALETTE["blue"]
    junk = {
        "bar": lambda d: d.rectangle((40, 100, 200, 140), fill=blue),
        "ring": lambda d: (d.ellipse((60, 60, 180, 180), fill=blue), d.ellipse((95, 95, 145, 145), fill=BACKGROUND)),
        "cross": lambda d: (d.rectangle((110, 50, 146, 200), fill=blue), d.rectangle((50, 110, 200, 146), fill=blue)),
        "ellipse": lambda d: d.ellipse((40, 90, 200, 170), fill=blue),
        "L": lambda d: (d.rectangle((60, 60, 100, 190), fill=blue), d.rectangle((60, 150, 190, 190), fill=blue)),
        "upside-down triangle": lambda d: d.polygon([(60, 60), (190, 60), (125, 190)], fill=blue),
    }
    for name, draw in junk.items():
        canvas = Image.new("RGB", (256, 256), BACKGROUND)
        draw(ImageDraw.Draw(canvas))
        assert detect(np.asarray(canvas.resize((64, 64), Image.BOX))) == [], name


def test_off_palette_colors_are_not_objects():
    """A colour half-way between two palette colours belongs to neither; a slightly drifted one keeps its name."""
    for rgb, expected in (
        ((100, 75, 205), []),  # between blue and purple
        ((235, 80, 35), []),  # between red and orange
        ((150, 90, 40), []),  # brown
        ((240, 145, 30), [("circle", "orange")]),  # Lab distance 10 from orange
        ((50, 118, 222), [("circle", "blue")]),  # Lab distance 11 from blue
    ):
        canvas = Image.new("RGB", (256, 256), BACKGROUND)
        ImageDraw.Draw(canvas).ellipse((60, 60, 180, 180), fill=rgb)
        found = detect(np.asarray(canvas.resize((64, 64), Image.BOX)))
        assert [(d.shape, d.color) for d in found] == expected, rgb


def test_shape_classification():
    for shape, size, cx, cy in itertools.product(SHAPES, (12 / 64, 0.25, 24 / 64), (0.3, 0.61), (0.35, 0.5)):
        s = scene("single_object", [Obj(shape, "green", cx, cy, size)])
        images = np.stack([render(s)] * 3)
        for image in (images[0], *degrade(images, seed=2)):
            found = detect(image)
            assert [d.shape for d in found] == [shape], (shape, size)
            assert np.allclose(found[0].box, s.objects[0].box(), atol=2 / 64)
        for other in SHAPES:
            expected = other == shape
            assert evaluate(images[0], scene("single_object", [Obj(other, "red", 0.5, 0.5, 0.3)]))[0] == expected


def test_wrong_count():
    triangles = [Obj("triangle", "purple", x, 0.3, 0.2) for x in (0.15, 0.5, 0.85)]
    asked = scene("counting", triangles)
    assert asked.caption == "a photo of three triangles"
    assert evaluate(render(asked), asked) == (True, "")
    ok, reason = evaluate(render(scene("counting", triangles[:2])), asked)
    assert not ok and reason == "expected triangle>=3, found 2"
    four = triangles + [Obj("triangle", "white", 0.5, 0.75, 0.2)]
    ok, reason = evaluate(render(scene("counting", four)), asked)
    assert not ok and reason == "expected triangle<4, found 4"
    # other shapes are not counted (GenEval excludes only more of the counted class)
    extra = triangles + [Obj("circle", "white", 0.5, 0.75, 0.2)]
    assert evaluate(render(scene("counting", extra)), asked)[0]


def test_swapped_position():
    circle, square = Obj("circle", "red", 0.25, 0.5, 0.25), Obj("square", "blue", 0.75, 0.5, 0.25)
    left = scene("position", [circle, square], "left of")
    assert left.caption == "a photo of a circle left of a square"
    image = render(left)
    assert evaluate(image, left) == (True, "")
    ok, reason = evaluate(image, scene("position", [circle, square], "right of"))
    assert not ok and "right of" in reason
    assert not evaluate(image[:, ::-1], left)[0]  # mirrored: the circle is now right of the square
    assert evaluate(image[:, ::-1], scene("position", [circle, square], "right of"))[0]
    assert not evaluate(image, scene("position", [circle, square], "above"))[0]
    below = scene("position", [Obj("circle", "red", 0.5, 0.8, 0.25), Obj("square", "blue", 0.5, 0.2, 0.25)], "below")
    assert evaluate(render(below), below)[0] and not evaluate(render(below)[::-1], below)[0]


def test_missing_object():
    circle, square = Obj("circle", "green", 0.3, 0.3, 0.25), Obj("square", "yellow", 0.7, 0.7, 0.25)
    for task in ("two_object", "color_attr"):
        asked = scene(task, [circle, square])
        assert evaluate(render(asked), asked) == (True, "")
        ok, reason = evaluate(render(scene("single_object", [circle])), asked)
        assert not ok and reason == "expected square>=1, found 0"
    asked = scene("position", [circle, square], "above")
    ok, reason = evaluate(render(scene("single_object", [square])), asked)
    assert not ok and reason == "expected circle>=1, found 0"
    ok, reason = evaluate(render(scene("single_object", [circle])), asked)
    assert not ok and "no target" in reason


def test_color_binding_and_ignored_colors():
    circle, square = Obj("circle", "red", 0.3, 0.3, 0.25), Obj("square", "green", 0.7, 0.7, 0.25)
    image = render(scene("color_attr", [circle, square]))
    swapped = [Obj("circle", "green", 0.3, 0.3, 0.25), Obj("square", "red", 0.7, 0.7, 0.25)]
    ok, reason = evaluate(image, scene("color_attr", swapped))
    assert not ok and "expected green circle" in reason and "expected red square" in reason
    # tasks whose captions name no colour accept any colour and ignore extra objects, as GenEval does
    assert evaluate(image, scene("two_object", swapped))[0]
    assert evaluate(image, scene("single_object", [Obj("circle", "blue", 0.5, 0.5, 0.2)]))[0]
    assert evaluate(image, scene("colors", [Obj("square", "green", 0.5, 0.5, 0.2)]))[0]
    assert not evaluate(image, scene("colors", [Obj("square", "red", 0.5, 0.5, 0.2)]))[0]
