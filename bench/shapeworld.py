"""
ShapeWorld: captioned shape scenes and ShapeEval, a rule-based GenEval for them (numpy + pillow only).

The world
  8 colours (red orange yellow green blue purple white black) x 3 shapes (circle square triangle) on one plain
  mid-grey background (128, as far from white as from black; one background keeps the toy easy to learn and makes
  "sits on the background" a sharp test for ShapeEval). Every shape fills a square box of side `size`: a circle of
  that diameter, an axis-aligned square, an apex-up triangle with base = height = size. Objects are 12-24 px at
  64x64, never overlap (a gap of at least 3 px at 64x64) and stay 1 px inside the border. Colours are far apart in
  Lab so that an 8x autoencoder's blur and colour drift do not move one into another; orange/yellow and red/orange,
  the classic confusions, are kept but pushed apart in hue (>= 53 in Lab).

Tasks and captions (GenEval's six, its prompt templates)
  single_object  "a photo of a circle"                      1 object
  two_object     "a photo of a circle and a square"         2 objects, two different shapes
  counting       "a photo of three triangles"               2-4 objects of one shape
  colors         "a photo of a yellow square"               1 object
  position       "a photo of a circle left of a square"     2 objects, different shapes, objects[0] is the subject
  color_attr     "a photo of a red square and a green circle"  2 objects, different shapes and colours
  Colour words appear only where the task scores colour (colors, color_attr), exactly as in GenEval's prompts;
  elsewhere objects get a random palette colour that the caption leaves open. Why: it keeps the six tasks distinct
  (colour binding is tested only by colors/color_attr), a diffusion model is built to sample such one-to-many
  mappings, and ShapeEval accepts any palette colour where the caption names none, so the score stays meaningful.
  Position scenes are unambiguous: the stated relation holds at twice GenEval's margin and no other relation holds
  even at zero margin.

ShapeEval (GenEval's Mask2Former detector and CLIP colour classifier replaced by rules)
  1. Every pixel goes to the nearest palette colour or the background, nearest in CIE Lab (a lookup table on
     5-bit RGB): nearest-colour needs no per-colour thresholds, which would confuse neighbours like orange/yellow.
  2. Connected components (4-neighbour) of one colour; the colour of a detection is its component's colour.
  3. A component is an object (GenEval: a detection above threshold) when it
     - covers >= 70% of the smallest triangle (50 px at 64x64): smaller ones are noise;
     - is surrounded by background: the median Lab distance to the background of the pixels 2 px outside it
       is <= 20. Objects in this world sit on the plain background; patches of a smooth random colour field do not.
     - is its colour inside: the median Lab distance of its inner pixels to its palette colour is <= 20, under half
       the gap to the next colour (a colour half-way between two palette colours is neither);
     - matches a shape: IoU >= 0.75 with the ideal circle, square or apex-up triangle of the same area and centroid
       (both survive blur, unlike a bounding box: a blurred triangle loses its tips); the best IoU names the shape.
  4. GenEval's rules on the objects, with area standing in for detector confidence (largest first):
     each caption object must be found (its count of its shape); where the caption names a colour, the largest
     `count` objects of that shape must have it; position compares the largest subject and reference boxes with
     GenEval's relative_position (margin 0.1 x the sum of the two box sizes, not of the image size; the direction
     must carry over half of the offset); counting also requires fewer than n + 1 (GenEval's exclude clause), so it
     is "exactly n" of that shape, whatever their colours. Objects the caption does not mention are ignored
     everywhere else, as in GenEval: "a photo of a circle" is right with a circle and a square.
  overall = mean of the per-task accuracies.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------
# The world

SHAPES = ("circle", "square", "triangle")
PALETTE = {  # sRGB; any two colours (and the background) are >= 43 apart in Lab, chromatic pairs >= 48
    "red": (220, 20, 60),
    "orange": (250, 135, 10),
    "yellow": (245, 225, 40),
    "green": (30, 155, 60),
    "blue": (40, 110, 230),
    "purple": (165, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
BACKGROUND = (128, 128, 128)
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")

MIN_SIZE, MAX_SIZE = 12 / 64, 24 / 64  # object box side, fraction of the image
MAX_SIZE_CROWDED = 19 / 64  # for 3-4 objects: four 24 px boxes and their gaps rarely fit
GAP = 3 / 64  # minimum empty space between two object boxes
BORDER = 1 / 64  # minimum empty space between a box and the image edge
POSITION_MARGIN = 0.1  # GenEval's position_threshold
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased, deterministic edges


@dataclass
class Obj:
    shape: str
    color: str
    cx: float  # centre, fraction of the image width
    cy: float  # centre, fraction of the image height (0 = top)
    size: float  # side of the object's square box, fraction of the image

    def box(self) -> tuple[float, float, float, float]:  # x0, y0, x1, y1
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    task: str
    caption: str
    objects: list[Obj]
    relation: str | None = None  # position only: objects[0] is `relation` objects[1]


def relations(box_a, box_b, margin: float = POSITION_MARGIN) -> set[str]:
    """Where box A lies relative to box B (GenEval's rule): the centre offset shrunk by margin x (size A + size B)
    per axis must be non-zero, and a direction counts only if it carries > half of the offset's length."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2  # [2] (dx, dy), y grows downwards
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])  # [2]
    shrunk = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(obj: Obj, with_color: bool) -> str:
    words = f"{obj.color} {obj.shape}" if with_color else obj.shape
    return f"{_article(words)} {words}"


def caption_for(task: str, objects: list[Obj], relation: str | None = None) -> str:
    if task == "single_object":
        return f"a photo of {_noun(objects[0], False)}"
    if task == "two_object":
        return f"a photo of {_noun(objects[0], False)} and {_noun(objects[1], False)}"
    if task == "counting":
        return f"a photo of {NUMBER_WORDS[len(objects)]} {objects[0].shape}s"
    if task == "colors":
        return f"a photo of {_noun(objects[0], True)}"
    if task == "position":
        return f"a photo of {_noun(objects[0], False)} {relation} {_noun(objects[1], False)}"
    if task == "color_attr":
        return f"a photo of {_noun(objects[0], True)} and {_noun(objects[1], True)}"
    raise ValueError(f"unknown task {task!r}")


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (for a word-level tokenizer)."""
    words = {"a", "an", "photo", "of", "and", *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBER_WORDS.values()}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def _boxes_apart(a, b) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _place(rng: np.random.Generator, specs: list[tuple[str, str]], max_size: float) -> list[Obj] | None:
    """Drop (shape, colour) objects one by one at random free spots; None if the layout got stuck."""
    objects = []
    for shape, color in specs:
        for _ in range(100):
            size = rng.uniform(MIN_SIZE, max_size)
            lo, hi = BORDER + size / 2, 1 - BORDER - size / 2
            obj = Obj(shape, color, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(size))
            if all(_boxes_apart(obj.box(), o.box()) for o in objects):
                objects.append(obj)
                break
        else:
            return None
    return objects


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[rng.integers(len(options))])


def make_scene(rng: np.random.Generator, task: str | None = None) -> Scene:
    """One random scene of `task` (drawn uniformly when None)."""
    task = task or _pick(rng, TASKS)
    two_shapes = [str(s) for s in rng.permutation(SHAPES)[:2]]  # multi-object tasks name different shapes
    if task in ("single_object", "colors"):
        specs = [(_pick(rng, SHAPES), _pick(rng, COLORS))]
    elif task in ("two_object", "position"):
        specs = [(s, _pick(rng, COLORS)) for s in two_shapes]
    elif task == "color_attr":
        specs = list(zip(two_shapes, [str(c) for c in rng.permutation(COLORS)[:2]]))
    elif task == "counting":
        shape = _pick(rng, SHAPES)
        specs = [(shape, _pick(rng, COLORS)) for _ in range(rng.integers(2, 5))]
    else:
        raise ValueError(f"unknown task {task!r}")
    relation = _pick(rng, RELATIONS) if task == "position" else None
    max_size = MAX_SIZE if len(specs) <= 2 else MAX_SIZE_CROWDED
    for _ in range(1000):  # a few tries are typical; the bound turns a broken rule into an error, not a hang
        objects = _place(rng, specs, max_size)
        if objects is None:
            continue
        if relation is not None:
            box_a, box_b = objects[0].box(), objects[1].box()
            clear = relation in relations(box_a, box_b, 2 * POSITION_MARGIN)
            if not clear or relations(box_a, box_b, 0.0) != {relation}:
                continue
        return Scene(task, caption_for(task, objects, relation), objects, relation)
    raise RuntimeError(f"no layout found for {task} {specs} {relation}")


def make_scenes(n: int, seed: int, tasks=TASKS) -> list[Scene]:
    """n scenes, tasks cycled in order (equal shares), deterministic in seed."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, tasks[i % len(tasks)]) for i in range(n)]


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]."""
    s = size * SUPERSAMPLE
    canvas = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * s for v in obj.box())
        # PIL boxes are inclusive of their last pixel, hence the - 1
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=PALETTE[obj.color])
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=PALETTE[obj.color])
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=PALETTE[obj.color])
    return np.asarray(canvas.resize((size, size), Image.BOX))


# ----------------------------------------------------------------------------------------------------------------
# ShapeEval


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] sRGB in 0..255 -> [..., 3] CIE Lab (D65)."""
    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# Lab and nearest colour are looked up on 5-bit RGB (error <= 4/255 per channel): one gather per image
_BIN_CENTRES = np.arange(32) * 8 + 4.0
LAB_TABLE = _srgb_to_lab(np.stack(np.meshgrid(*[_BIN_CENTRES] * 3, indexing="ij"), -1))  # [32, 32, 32, 3]
PALETTE_LAB = _srgb_to_lab(np.array([*PALETTE.values(), BACKGROUND], dtype=np.float64))  # [9, 3], background last
NEAREST_COLOR = ((LAB_TABLE[..., None, :] - PALETTE_LAB) ** 2).sum(-1).argmin(-1).astype(np.uint8)  # [32, 32, 32]
BACKGROUND_ID = len(COLORS)

# Detection thresholds, set from 64x64 renders blurred (sigma 1.5 px) + noised (std 12), harsher than the tests:
# 1st percentile of shape IoU 0.77, 99th of colour distance 12.5 and of surround distance 15.8; on smooth random
# colour fields the median surround distance is 37.
MIN_AREA = 0.7 * 0.5 * MIN_SIZE**2  # 70% of the smallest triangle (72 px at 64x64), fraction of the image
MIN_SHAPE_IOU = 0.75  # vs the ideal shape of the same area and centroid
MAX_COLOR_DE = 20.0  # median Lab distance of an object's inner pixels to its palette colour (half the gap to the next)
MAX_SURROUND_DE = 20.0  # median Lab distance of the pixels 2 px around an object to the background


@dataclass
class Detection:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1, fractions of the image
    area: float  # fraction of the image


def color_map(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W, 3] -> (Lab float [H, W, 3], nearest palette index uint8 [H, W], BACKGROUND_ID for background)."""
    q = image >> 3
    index = (q[..., 0], q[..., 1], q[..., 2])
    return LAB_TABLE[index], NEAREST_COLOR[index]


def components(ids: np.ndarray) -> np.ndarray:
    """4-connected components of equal, non-background ids: int [H, W], each pixel -> the smallest flat index of its
    component (union-find with all edges at once: hook roots onto smaller roots, then pointer-jump to the roots)."""
    h, w = ids.shape
    flat = np.arange(h * w).reshape(h, w)
    fg = ids != BACKGROUND_ID
    right = (ids[:, 1:] == ids[:, :-1]) & fg[:, 1:]
    down = (ids[1:] == ids[:-1]) & fg[1:]
    a = np.concatenate([flat[:, :-1][right], flat[:-1][down]])  # [E] edge ends, a < b
    b = np.concatenate([flat[:, 1:][right], flat[1:][down]])
    parent = np.arange(h * w)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent.reshape(h, w)
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _dilate(mask: np.ndarray) -> np.ndarray:
    """bool [H, W] grown by one pixel in all 8 directions."""
    tall = mask.copy()
    tall[1:] |= mask[:-1]
    tall[:-1] |= mask[1:]
    wide = tall.copy()
    wide[:, 1:] |= tall[:, :-1]
    wide[:, :-1] |= tall[:, 1:]
    return wide


def _fit_shape(mask: np.ndarray) -> tuple[str, float]:
    """bool [H, W] one component -> (shape, IoU) of the best ideal shape with the same area and centroid.
    Area and centroid survive blur and ragged edges; a bounding box does not (a blurred triangle loses its tips)."""
    ys, xs = np.nonzero(mask)
    area, cy, cx = len(ys), ys.mean() + 0.5, xs.mean() + 0.5
    y, x = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5  # pixel centres
    side = np.sqrt(2 * area)  # triangle: base = height = side, centroid 2/3 of the way down from the apex
    top = cy - 2 * side / 3
    ideal = {
        "circle": (x - cx) ** 2 + (y - cy) ** 2 <= area / np.pi,
        "square": (np.abs(x - cx) <= np.sqrt(area) / 2) & (np.abs(y - cy) <= np.sqrt(area) / 2),
        "triangle": (y >= top) & (y <= top + side) & (np.abs(x - cx) <= (y - top) / 2),
    }
    iou = {s: (mask & t).sum() / (mask | t).sum() for s, t in ideal.items()}
    best = max(iou, key=iou.get)
    return best, float(iou[best])


def _median_distance(lab: np.ndarray, ref: np.ndarray) -> float:
    """Median Lab distance of [N, 3] pixels to [3]; inf when there are none (nothing to vouch for the object)."""
    return float(np.median(np.linalg.norm(lab - ref, axis=-1))) if len(lab) else np.inf


def detect(image: np.ndarray) -> list[Detection]:
    """uint8 [H, W, 3] -> the shapes found in it, largest first (area plays the detector's confidence).
    An object is a component of one palette colour that (1) is large enough, (2) sits on the plain background,
    (3) is that colour inside, not a gradient passing through it, and (4) matches a shape: (2) and (3) are what tell
    a drawn shape from a patch of a smooth random colour field."""
    h, w, _ = image.shape
    lab, ids = color_map(image)
    roots = components(ids)
    area = np.bincount(roots[ids != BACKGROUND_ID], minlength=h * w)  # [H*W] pixels per component root
    found = []
    for root in np.nonzero(area >= MIN_AREA * h * w)[0]:
        mask = roots == root
        color_id = ids.flat[root]
        near = _dilate(mask)
        surround = _dilate(near) & ~near  # 2 px out: past the anti-aliased / blurred edge
        if _median_distance(lab[surround], PALETTE_LAB[BACKGROUND_ID]) > MAX_SURROUND_DE:
            continue  # cheapest test first: it rejects most patches of a colour field
        inner = mask & ~_dilate(~mask)  # edge pixels are blends with the background, judge the colour inside
        if _median_distance(lab[inner if inner.any() else mask], PALETTE_LAB[color_id]) > MAX_COLOR_DE:
            continue
        shape, iou = _fit_shape(mask)
        if iou < MIN_SHAPE_IOU:
            continue
        ys, xs = np.nonzero(mask)
        box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        found.append(Detection(shape, COLORS[color_id], box, area[root] / (h * w)))
    return sorted(found, key=lambda d: -d.area)


@dataclass
class Requirement:
    shape: str
    count: int = 1
    color: str | None = None
    relation: str | None = None  # relative to the objects matched by the first requirement


def requirements(scene: Scene) -> tuple[list[Requirement], list[Requirement]]:
    """What the caption asks for, as GenEval metadata: (include, exclude). Exclude means "fewer than count"."""
    objs, task = scene.objects, scene.task
    if task in ("single_object", "two_object"):
        return [Requirement(o.shape) for o in objs], []
    if task in ("colors", "color_attr"):
        return [Requirement(o.shape, color=o.color) for o in objs], []
    if task == "counting":
        return [Requirement(objs[0].shape, len(objs))], [Requirement(objs[0].shape, len(objs) + 1)]
    if task == "position":  # reference first, as GenEval lists it
        return [Requirement(objs[1].shape), Requirement(objs[0].shape, relation=scene.relation)], []
    raise ValueError(f"unknown task {task!r}")


def evaluate(image: np.ndarray, scene: Scene) -> tuple[bool, str]:
    """GenEval's verdict on one uint8 [H, W, 3] image: (correct, reason); reason is empty when correct."""
    found = detect(image)
    by_shape = {s: [d for d in found if d.shape == s] for s in SHAPES}
    include, exclude = requirements(scene)
    reasons = []
    matched = []  # per include requirement: the detections that met it, or None
    for req in include:
        dets = by_shape[req.shape][: req.count]
        ok = len(dets) == req.count
        if not ok:
            reasons.append(f"expected {req.shape}>={req.count}, found {len(dets)}")
        elif req.color is not None and sum(d.color == req.color for d in dets) < req.count:
            ok = False
            reasons.append(f"expected {req.color} {req.shape}, found {' '.join(d.color for d in dets)}")
        elif req.relation is not None:  # one subject, one reference (both count 1)
            if matched[0] is None:
                ok = False
                reasons.append(f"no target for {req.shape} to be {req.relation}")
            elif req.relation not in (found_rel := relations(dets[0].box, matched[0][0].box)):
                ok = False
                reasons.append(f"expected {req.shape} {req.relation} target, found {sorted(found_rel)}")
        matched.append(dets if ok else None)
    for req in exclude:
        if len(by_shape[req.shape]) >= req.count:
            reasons.append(f"expected {req.shape}<{req.count}, found {len(by_shape[req.shape])}")
    return not reasons, "; ".join(reasons)


def score(images, scenes: list[Scene]) -> dict:
    """ShapeEval over uint8 [N, H, W, 3] images (array or list): per-task accuracy and their mean."""
    per_task = {}
    for image, scene in zip(images, scenes, strict=True):
        per_task.setdefault(scene.task, []).append(evaluate(np.asarray(image), scene)[0])
    accuracy = {t: float(np.mean(v)) for t, v in per_task.items()}
    return {"per_task": accuracy, "overall": float(np.mean(list(accuracy.values()))), "n": len(scenes)}
