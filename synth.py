"""
Generate L2P's training corpus: images of the source latent model (Z-Image) for a list of prompts, plus the prompts'
text features, cached so that training never has to load the 4B text encoder.

    python synth.py --src Z-Image-Turbo/ --prompts builtin:10000 --out data/zimage-turbo-20k        # the paper's corpus
    torchrun --nproc_per_node=8 synth.py --src Z-Image-Turbo/ --prompts builtin:10000 --out data/zimage-turbo-20k
    python synth.py --src Z-Image/ --prompts my_prompts.csv --out data/zimage-base --res 768         # base model, CFG

L2P trains only on images its source generates (paper: 10k prompts x 2 seeds = 20k images at 1024^2): they lie on the
manifold the kept backbone already models, which is why the transfer converges fast (source-LDM data beats real
photos in the paper's ablation).

Output, in --out:
  images/<prompt index:06d>_s<seed index>.png  8-bit RGB; prompt, seed, steps, cfg, shift, source in PNG text chunks
  features/<prompt index:06d>.safetensors      "cap" [L, D] bf16: the prompt's Qwen3 features, valid rows only
  features/negative.safetensors                the same for the empty negative prompt (only when CFG is on)
  metadata.jsonl                               one row per image, sorted by prompt index then seed index
  synth_config.json                            the corpus settings; a rerun with other settings is refused
  grid.png                                     thumbnails of the first images, for a quick look

Seeds: image j of prompt i uses seed --seed + i * --seeds + j. Its noise depends on that seed alone
(model.noise_for_seeds) and each prompt is encoded on its own, so with --batch-size 1 an image is bit-identical
whatever the number of GPUs or the point a run was resumed from.

Resume: run the same command again. An image counts as done only if it is under its final name (every file is written
to a temp name, then renamed) and decodes; a features file only if it loads and holds that prompt. Temp files of a
killed run are never trusted and are deleted at the end. metadata.jsonl is rebuilt at the end from what is on disk.

Several GPUs: torchrun --nproc_per_node=K. Job k = (prompt k // seeds, seed index k % seeds) belongs to rank k % K.
The features file of a prompt is written by the rank that owns its first image; any other rank that needs the
features and does not find the file encodes the prompt itself (same result) rather than waiting. Rank 0 writes
metadata.jsonl and grid.png once every rank is done.
"""

import argparse
import csv
import gc
import hashlib
import io
import json
import os
import sys
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

import model
from sample import save_png, to_uint8

# ----------------------------------------------------------------------------------------------------------------
# Built-in prompts: the paper's taxonomy (4 super-classes, 17 sub-classes), composed deterministically
# ----------------------------------------------------------------------------------------------------------------

# Per sub-class: subjects (may hold {text}, filled from `texts`: words the image has to render), settings and detail
# sentences; optional mediums / lights that are mixed with the shared pools below.
PROMPT_TAXONOMY = {
    "nature": {
        "landscapes": dict(
            subjects=["a jagged mountain range", "a wide river delta", "a desert of rippled sand dunes",
                      "a terraced rice field", "a volcanic black-sand beach", "a quiet alpine lake",
                      "a canyon of layered red rock", "a misty pine forest", "a field of lavender",
                      "a frozen waterfall", "a chain of small green islands", "a rolling tea plantation",
                      "a vast salt flat", "a birch forest", "a basalt sea cliff", "a meandering stream",
                      "a glacier tongue", "a savanna with scattered acacia trees"],
            settings=["under a sky of towering cumulus clouds", "seen across a calm reflective lake",
                      "at the edge of a sheer cliff", "after a heavy summer rain", "beneath a star-filled night sky",
                      "in the first snow of winter", "during the autumn color change",
                      "with a winding dirt road leading into the distance", "framed by wildflowers in the foreground",
                      "with a lone wooden cabin nestled in it", "shrouded in low morning fog",
                      "stretching toward a distant range of peaks"],
            details=["Tiny hikers on a ridge give a sense of the enormous scale",
                     "Long shadows stretch across the textured terrain",
                     "A flock of birds crosses the sky in a loose V formation",
                     "Every layer of rock and vegetation is rendered in crisp detail",
                     "Mist pools in the valleys between the hills",
                     "Sunlight breaks through a gap in the clouds and spotlights one hillside",
                     "Ripples on the water catch small glints of light",
                     "The foreground rocks are covered in bright green moss",
                     "A faint rainbow arcs over the far side of the valley",
                     "Wind bends the tall grass in one direction",
                     "The horizon fades into soft layers of blue haze",
                     "Patches of snow linger in the shaded gullies"],
            mediums=["A landscape photograph of", "A wide panoramic photo of", "A romantic-era oil painting of"]),
        "animals": dict(
            subjects=["a snow leopard", "a red fox", "a pair of emperor penguins", "a humpback whale", "a barn owl",
                      "a herd of African elephants", "a chameleon", "a golden retriever puppy", "a tabby cat",
                      "a hummingbird", "a green sea turtle", "a family of meerkats", "a majestic red deer stag",
                      "a koi fish", "a monarch butterfly", "a shaggy highland cow", "a scarlet macaw", "a grey wolf"],
            settings=["resting on a rocky ledge", "in a snowy birch forest", "in shallow turquoise water",
                      "perched on a mossy branch", "crossing a dusty savanna", "among colorful coral",
                      "on a sunlit windowsill", "in a meadow of tall grass", "beside a frozen stream",
                      "at the edge of a misty pond", "in a flower garden", "on a weathered wooden fence"],
            details=["Its eyes are in sharp focus and look straight at the viewer",
                     "Fine textures of fur, feathers or scales are rendered in crisp detail",
                     "It is caught mid-movement with a sense of alert energy",
                     "Small insects drift through the air around it",
                     "The natural patterns of its markings stand out vividly",
                     "A second, smaller one of its kind waits in the background",
                     "The background melts into a soft, creamy blur",
                     "A few fallen leaves lie scattered around it",
                     "Its reflection is faintly visible below it",
                     "Its breath forms a small cloud in the cool air"],
            mediums=["A wildlife photograph of", "A National Geographic style photo of",
                     "A detailed naturalist illustration of"]),
        "plants": dict(
            subjects=["a blooming cherry tree", "a cluster of wild mushrooms", "a single red rose",
                      "a potted monstera plant", "a field of sunflowers", "an ancient gnarled olive tree",
                      "a bed of tulips in every color", "a fern unfurling a new frond", "a pink lotus flower",
                      "a bonsai juniper", "a moss-covered fallen log", "a cactus in bloom", "a wisteria arch",
                      "a dandelion gone to seed", "a dense bamboo grove", "a wall of climbing ivy"],
            settings=["in a quiet Japanese garden", "on a rain-soaked forest floor", "in a sunlit greenhouse",
                      "beside a crumbling stone wall", "in a terracotta pot on a balcony", "in the middle of a desert",
                      "along a country lane", "in a glass terrarium", "at the edge of a pond",
                      "on a windowsill in a small apartment", "in a botanical garden", "in an overgrown courtyard"],
            details=["Dewdrops cling to the petals and leaves", "The veins of each leaf glow against the light",
                     "Fallen petals are scattered on the ground below", "A bee hovers close to one of the blossoms",
                     "New buds are just beginning to open", "The background is a soft wash of green",
                     "Delicate shadows of leaves fall across the scene",
                     "Tiny droplets from a recent rain sparkle everywhere",
                     "The colors shift from deep green to bright yellow",
                     "A small snail crawls slowly along one stem"],
            mediums=["A macro photograph of", "A vintage botanical illustration of"]),
        "food": dict(
            subjects=["a bowl of steaming ramen", "a stack of fluffy pancakes", "a wood-fired margherita pizza",
                      "a plate of colorful sushi", "a rustic loaf of sourdough bread",
                      "a slice of layered chocolate cake", "a bowl of fresh fruit salad",
                      "a cappuccino with latte art", "a platter of street tacos", "a tray of glazed cinnamon rolls",
                      "a hearty beef stew", "a glass of iced lemonade", "a generous charcuterie board",
                      "a bowl of spicy red curry", "a basket of fresh croissants", "a summer berry tart"],
            settings=["on a rustic wooden table", "on a marble countertop", "at a busy street food stall",
                      "on a checkered picnic blanket", "in a cozy cafe by the window", "on a dark slate background",
                      "in a sunlit farmhouse kitchen", "at a candlelit dinner table", "on a white ceramic plate",
                      "at an outdoor market", "next to a steaming pot on the stove", "on a breakfast tray in bed"],
            details=["Steam rises gently from the dish", "Fresh herbs are scattered on top as garnish",
                     "A hand reaches in from the side with a fork", "Crumbs and a folded linen napkin sit beside it",
                     "Every glossy surface and texture looks appetizing",
                     "Small bowls of spices and sauces surround it", "A drizzle of sauce runs down one side",
                     "Condensation beads on a cold glass nearby", "The background shows a softly blurred kitchen",
                     "A cut reveals the colorful layers inside"],
            mediums=["A professional food photograph of", "An overhead food photo of"]),
        "sky and weather": dict(
            subjects=["a supercell thunderstorm", "the aurora borealis", "a double rainbow",
                      "a blazing orange sunset", "a swirling blizzard", "a summer lightning storm", "the Milky Way",
                      "a bank of rolling fog", "a tornado on the horizon", "a full moon rising",
                      "a passing spring rain shower", "a sky full of lenticular clouds", "a total solar eclipse",
                      "an approaching sandstorm", "morning frost under a pale sky"],
            settings=["over a flat prairie", "above a snowy mountain village", "over a calm ocean",
                      "above a quiet coastal town", "over a wheat field", "above a frozen lake",
                      "over a city skyline", "above a lighthouse on a cliff", "over a desert highway",
                      "above dark pine forests", "over a harbor full of boats", "seen from a grassy hilltop"],
            details=["Rays of light fan out through gaps in the clouds", "Raindrops streak diagonally through the air",
                     "The clouds are layered in deep shades of purple and grey",
                     "A lone figure with an umbrella watches from below",
                     "The colors of the sky are mirrored on the wet ground",
                     "Snowflakes drift slowly past the camera",
                     "Distant lightning lights up the underside of the clouds", "The air glows with a faint haze",
                     "Stars are visible through a break in the clouds",
                     "Wind whips loose leaves across the foreground"]),
    },
    "design": {
        "architecture": dict(
            subjects=["a brutalist concrete library", "a glass skyscraper with a twisting facade",
                      "a Gothic cathedral", "a traditional Japanese wooden temple", "a Moroccan riad courtyard",
                      "a timber-frame mountain chalet", "a modernist villa with cantilevered terraces",
                      "a row of colorful Victorian townhouses", "a futuristic museum with flowing white curves",
                      "an abandoned Art Deco theater", "a whitewashed Greek chapel with a blue dome",
                      "a bamboo pavilion", "a red-brick factory converted into lofts", "a suspension bridge",
                      "a stone lighthouse", "an iron and glass conservatory"],
            settings=["on a hillside overlooking the sea", "in a dense city center", "surrounded by autumn trees",
                      "on the edge of a quiet canal", "in a snowy mountain valley", "in the middle of a desert",
                      "at the end of a long tree-lined avenue", "on a busy street corner", "reflected in a still pool",
                      "beside a river in an old town", "on a rocky coastline", "in a lush tropical garden"],
            details=["Clean lines and repeating geometric patterns define the facade",
                     "Warm light glows from the windows", "A few pedestrians walk past, giving a sense of scale",
                     "Weathered materials show decades of history", "Ivy climbs the lower walls",
                     "The structure casts a long geometric shadow", "Large windows reflect the surrounding sky",
                     "Intricate carved ornaments decorate the entrance",
                     "A wide staircase leads up to the main door", "Its roofline stands out sharply against the sky"],
            mediums=["An architectural photograph of", "An isometric illustration of",
                     "An architectural watercolor rendering of"]),
        "interiors": dict(
            subjects=["a Scandinavian living room", "a cozy reading nook", "a minimalist kitchen",
                      "a luxurious hotel lobby", "a cluttered artist's studio", "a bohemian bedroom",
                      "a mid-century modern office", "a quiet library with tall bookshelves",
                      "a sunlit bathroom with a freestanding tub", "a tiny studio apartment",
                      "a rustic farmhouse dining room", "a neon-lit gaming room", "a grand ballroom",
                      "a plant-filled cafe", "a Japanese tatami room"],
            settings=["with floor-to-ceiling windows", "with exposed brick walls", "with a view over a snowy forest",
                      "filled with indoor plants", "with polished concrete floors",
                      "overlooking a rainy city street", "with a crackling fireplace", "with high vaulted ceilings",
                      "with terracotta tiles and arched doorways", "with warm wooden beams",
                      "with a large abstract painting on the wall", "opening onto a garden terrace"],
            details=["A soft wool throw is draped over an armchair", "A vase of fresh flowers sits on the table",
                     "Books and magazines are stacked casually", "Every surface is neat and carefully styled",
                     "A cat sleeps curled up on a cushion", "Light pours across the floor in long stripes",
                     "Pendant lamps hang low over the table", "Textured fabrics in neutral tones fill the room",
                     "A record player and a stack of vinyl sit in the corner",
                     "A steaming mug rests on a side table"],
            mediums=["An interior design photograph of", "A wide-angle real estate photo of"]),
        "products": dict(
            subjects=["a pair of white running shoes", "a vintage film camera",
                      "a minimalist wristwatch with a leather strap", "a faceted perfume bottle",
                      "a pair of wireless headphones", "a mechanical keyboard", "a leather backpack",
                      "a smartphone with a glossy back", "a glass teapot", "a handmade wooden chair",
                      "a designer desk lamp", "a skincare serum bottle", "a retro transistor radio",
                      "a set of chef's knives", "a sleek electric kettle",
                      'a ceramic coffee mug printed with the words "{text}"',
                      'a canvas tote bag printed with "{text}"'],
            texts=["GOOD MORNING", "Stay Curious", "COFFEE FIRST", "Hello", "Made by Hand", "WEEKEND"],
            settings=["on a pastel pink background", "on a block of rough stone",
                      "floating above a reflective surface", "on a clean white backdrop",
                      "on a wooden desk next to a notebook", "among scattered autumn leaves",
                      "on a sunlit windowsill", "on a glass shelf", "in a shallow pool of water", "on a bed of moss",
                      "on a concrete pedestal", "against a gradient teal background"],
            details=["Subtle reflections highlight its curved surfaces",
                     "The materials and stitching are visible in fine detail",
                     "A soft shadow grounds it on the surface", "Water droplets bead across its surface",
                     "A few props hint at how it is used",
                     "The composition leaves generous empty space around it",
                     "Tiny scratches and textures make it feel real", "A gentle glow outlines its silhouette",
                     "Color-matched props echo its main color"],
            mediums=["A studio product photograph of", "A commercial advertising photo of", "A 3D product render of"],
            lights=["studio softbox lighting", "a single hard spotlight", "soft diffused studio light",
                    "rim lighting on a dark background"]),
        "graphic art": dict(
            subjects=["a geometric pattern of interlocking hexagons",
                      "an abstract composition of overlapping circles", "a flat landscape of rolling hills",
                      "a mandala with intricate symmetrical details", "a paper-cut scene of a coral reef",
                      "a retro synthwave sunset over a grid floor", "a minimalist fox logo made of simple shapes",
                      "a tarot card with an ornate sun design", "a stained-glass window of a peacock",
                      "an isometric tiny city block", "a collage of vintage botanical cutouts",
                      "a pixel-art castle", "a mosaic of a sea turtle",
                      'a bold typographic poster with the word "{text}"', 'an enamel pin design reading "{text}"'],
            texts=["DREAM", "BLOOM", "Stay Wild", "CREATE", "SEOUL", "NIGHT SHIFT"],
            settings=["on a textured paper background", "arranged in perfect symmetry",
                      "framed by a thin gold border", "set against a deep navy background",
                      "on a cream background with generous margins", "repeating as a seamless tile",
                      "centered on a square canvas", "layered in several depths of paper", "in a bold two-color print",
                      "surrounded by small star motifs", "on a black background", "inside a circular frame"],
            details=["Shapes have crisp, clean edges", "A fine grain texture gives it a printed feel",
                     "The layout follows a strict grid", "Thin outlines separate each colored area",
                     "Small decorative dots fill the empty spaces", "Negative space forms a hidden second image",
                     "Colors are limited to a carefully chosen palette", "Subtle shadows give the layers depth",
                     "Every element is precisely aligned and balanced",
                     "The style recalls mid-century travel posters"],
            mediums=["A flat vector illustration of", "A screen-printed design of", "A graphic design of"]),
        "vehicles": dict(
            subjects=["a vintage red convertible", "a steam locomotive", "a sleek electric sports car",
                      "a yellow school bus", "a wooden sailing boat", "a classic Vespa scooter", "a huge cargo ship",
                      "a hot air balloon", "a mountain bike", "a retro camper van", "a fighter jet", "a city tram",
                      "a fishing trawler", "a motorcycle with chrome details", "a propeller seaplane",
                      "a red cable car"],
            settings=["on a winding coastal road", "parked on a cobblestone street", "crossing a stone viaduct",
                      "in a busy harbor", "on a desert highway", "in a snowy mountain pass",
                      "in front of a neon-lit diner", "drifting above a green valley",
                      "in a rain-soaked city at night", "at a small rural station", "on a dirt trail through a forest",
                      "in a clean white showroom"],
            details=["Chrome and paint reflect the surroundings",
                     "Motion blur in the background suggests speed",
                     "Small details like rivets and badges are clearly visible", "A trail of dust rises behind it",
                     "Wet pavement reflects its lights", "Its paint shows a little wear and a few scratches",
                     "Someone waves from a window", "A thin plume of smoke curls into the air",
                     "Puddles on the ground mirror its shape", "Its silhouette is framed by the landscape"]),
    },
    "people": {
        "portraits": dict(
            subjects=["an elderly fisherman with a weathered face", "a young woman with freckles and curly red hair",
                      "a middle-aged man with a salt-and-pepper beard", "a little girl with braided hair",
                      "a Maasai elder in a red shuka", "a Korean grandmother smiling warmly",
                      "a young man with round glasses", "a ballet dancer with her hair in a bun",
                      "a tattooed chef", "a teenage boy holding a skateboard",
                      "a Nigerian woman in a colorful headwrap", "an old jazz musician holding a trumpet",
                      "a nurse at the end of a long shift", "a Mongolian eagle hunter in a fur hat",
                      "a farmer in a straw hat", "a scientist in a lab coat"],
            settings=["in front of a plain grey backdrop", "by a rain-streaked window", "in a sunlit wheat field",
                      "in a busy kitchen", "on a rooftop at dusk", "in a dim jazz club",
                      "in front of a weathered blue door", "in a cozy living room", "on a quiet train platform",
                      "on a windy beach", "in a workshop full of tools", "between library shelves"],
            details=["Soft catchlights shine in their eyes", "Every line and pore of the skin is visible",
                     "They look thoughtfully just past the camera", "A gentle smile plays across their face",
                     "Loose strands of hair are lifted by the wind", "Their hands rest calmly in the frame",
                     "The background falls off into a soft blur", "Their expression is calm and full of character",
                     "Their clothing shows real texture and wear"],
            mediums=["A close-up portrait photograph of", "A black-and-white portrait of", "An 85mm portrait photo of",
                     "A realistic oil portrait of"]),
        "fashion": dict(
            subjects=["a model in an oversized camel coat", "a woman in a flowing emerald silk gown",
                      "a man in a tailored navy suit", "a model in streetwear and a puffer jacket",
                      "a woman in a vintage polka dot dress", "a man in a linen shirt and straw hat",
                      "a model in a sculptural avant-garde outfit", "a couple in matching denim jackets",
                      "a woman in an embroidered silk kimono", "a model in a sequined evening dress",
                      "a man in a leather biker jacket", "a model in a chunky knit sweater and wide trousers",
                      'a model in a T-shirt printed with "{text}"'],
            texts=["NO BAD DAYS", "PARIS", "Good Vibes", "ARCHIVE 1994"],
            settings=["walking down a Paris street", "posing at the end of a runway",
                      "standing in a field of tall grass", "in a minimalist white studio",
                      "in front of a graffiti wall", "on a marble staircase", "at a rainy crosswalk",
                      "in a desert at sunset", "leaning against a vintage car", "in an empty subway station",
                      "on a balcony overlooking the city", "among racks of clothing in a boutique"],
            details=["The fabric moves naturally with each step", "Gold jewelry and sunglasses complete the look",
                     "The textures of wool, silk and leather are distinct", "The pose is confident and relaxed",
                     "The outfit's colors contrast with the background", "Wind lifts the hem of the garment",
                     "Careful styling shows in every fold and seam", "A small handbag hangs from one shoulder",
                     "The look is inspired by 1970s fashion", "Polished shoes finish the outfit"],
            mediums=["A high-fashion editorial photograph of", "A street style photo of",
                     "A fashion illustration of"]),
        "sports and activities": dict(
            subjects=["a surfer riding a huge wave", "a rock climber on an overhanging cliff",
                      "a group of kids playing soccer", "a marathon runner crossing the finish line",
                      "a yoga teacher holding a balanced pose", "a basketball player mid-dunk",
                      "a woman painting at an easel", "two friends cooking together",
                      "a skier carving through fresh powder", "a cyclist racing downhill",
                      "a potter shaping clay on a wheel", "a family having a picnic",
                      "a boxer training with a heavy bag", "a dance troupe rehearsing",
                      "an old man fishing from a pier", 'a runner wearing a race bib with the number "{text}"'],
            texts=["42", "107", "2024", "7", "318"],
            settings=["on a sunny afternoon", "in an old gym", "at sunrise by the sea", "in a city park",
                      "on a mountain slope", "in a crowded stadium", "in a bright studio", "in light rain",
                      "on a quiet lake", "in a backyard", "under floodlights at night", "on a forest trail"],
            details=["Water spray and dust are frozen in mid-air", "Muscles are tense with effort",
                     "Spectators cheer in the blurred background", "Faces show total concentration",
                     "Every piece of equipment is clearly visible", "Sweat glistens on their skin",
                     "The movement is captured at its peak moment", "Long shadows stretch across the ground",
                     "Laughter and joy are visible on every face", "Clothing flutters with the motion"],
            mediums=["A sports action photograph of", "A candid photo of", "A dynamic comic-book illustration of"]),
        "street life": dict(
            subjects=["a crowded night market", "a busy pedestrian crossing", "a street musician playing violin",
                      "a flower vendor with a cart", "commuters on a subway platform",
                      "a group of friends at an outdoor cafe", "children chasing soap bubbles in a square",
                      "a festival parade with colorful costumes", "a queue outside a small bakery",
                      "an old couple walking hand in hand", "a barber working at an open-air stall",
                      "cyclists waiting at a red light", "a crowd watching fireworks",
                      "a street cook tossing noodles in a wok"],
            settings=["in Tokyo", "in old Havana", "in a Moroccan medina", "in New York City",
                      "in a small Italian town", "in Mumbai during the monsoon", "in Mexico City",
                      "on a Paris boulevard", "in Hong Kong at night", "in an Istanbul bazaar",
                      "in a Nordic harbor town", "on a steep street in Lisbon"],
            details=["Lanterns and shop signs glow overhead", "Motion blur turns passersby into streaks of color",
                     "Puddles reflect the city lights", "A stray dog wanders through the scene",
                     "Laundry hangs between the buildings above", "Steam and smoke drift up from the food stalls",
                     "Everyone is dressed for the cool weather", "Small details tell a dozen stories at once",
                     "Scooters are parked along the curb", "A child looks directly at the camera"],
            mediums=["A street photograph of", "A documentary photo of", "An impressionist painting of"]),
    },
    "text rendering": {
        "signs": dict(
            subjects=['a neon sign reading "{text}"', 'a hand-painted wooden sign that says "{text}"',
                      'a shop front with the name "{text}" above the door', 'a road sign reading "{text}"',
                      'a chalkboard sidewalk sign with "{text}" written on it',
                      'an old enamel street sign reading "{text}"', 'a glowing theater marquee with the words "{text}"',
                      'a brass plaque engraved with "{text}"', 'a banner strung across a street reading "{text}"',
                      'a vintage motel sign saying "{text}"', 'a graffiti mural spelling "{text}"',
                      'a subway station sign reading "{text}"'],
            texts=["OPEN LATE", "FRESH COFFEE", "HOTEL MIRAMAR", "NO PARKING", "Bakery & Bread", "WELCOME",
                   "Mind the Gap", "CLOSED", "Books & Records", "NOODLE HOUSE", "EXIT", "Sunset Motel",
                   "Harbor Street", "LIVE MUSIC TONIGHT", "FLOWERS", "Since 1962"],
            settings=["on a rainy street at night", "above a small corner shop", "in a quiet seaside town",
                      "on a brick wall", "along a desert road", "in a busy downtown district",
                      "on an old wooden building", "in a snowy village", "next to a flight of stone steps",
                      "in a train station", "on a tiled wall", "at the entrance of a market"],
            details=["The lettering is crisp, evenly spaced and perfectly legible", "Every letter is clearly readable",
                     "The letters cast soft shadows on the wall behind",
                     "Paint is slightly chipped around the edges of the letters",
                     "Its reflection shimmers in a puddle below", "A passerby glances up at it",
                     "The typeface is a bold, clean sans-serif", "The letters are in an elegant hand-drawn script",
                     "Ivy frames the sign without covering the text"],
            mediums=["A street photograph of", "A sharp, well-composed photo of"]),
        "book covers and posters": dict(
            subjects=['a book cover titled "{text}"', 'a concert poster announcing "{text}"',
                      'a vintage travel poster with the headline "{text}"', 'a movie poster with the title "{text}"',
                      'a magazine cover with the headline "{text}"', "a children's picture book titled \"{text}\"",
                      'a vinyl record sleeve with the title "{text}"', 'an event flyer that reads "{text}"',
                      'a science fiction novel cover titled "{text}"', 'a cookbook cover titled "{text}"'],
            texts=["The Silent Orchard", "JAZZ NIGHT", "Letters from the Deep", "SUMMER FESTIVAL", "VISIT KYOTO",
                   "The Last Lighthouse", "ECHOES", "Midnight Garden", "THE LONG WINTER", "Stars Above Us",
                   "Small Kitchen", "NEON DREAMS", "Into the Wild Blue", "GRAND OPENING"],
            settings=["featuring a lone lighthouse on a cliff", "with a giant moon over the sea",
                      "with a minimalist geometric design", "with a painted forest in deep greens",
                      "lying on a wooden table", "pinned to a cork board", "displayed in a shop window",
                      "with a retro 1960s layout", "with a photograph of a city at night",
                      "featuring a fox in a snowy forest", "with bold Swiss-style typography",
                      "with a hand-drawn border of flowers"],
            details=["The title is set in large, clean, perfectly legible letters",
                     "A small author name appears at the bottom", "The typography is balanced with the artwork",
                     "The text is centered and sharply printed", "Fine paper texture is visible on the surface",
                     "The layout uses a strict grid with generous margins",
                     "Every letter of the title is spelled correctly", "The edges show slight wear",
                     "Smaller text below lists a date and a venue", "The colors are limited to three bold inks"],
            mediums=["A photograph of", "A flat graphic design of", "A high-resolution scan of"]),
        "labels and packaging": dict(
            subjects=['a glass jar of honey with a label reading "{text}"', 'a craft beer can labeled "{text}"',
                      'a wine bottle with an elegant label that says "{text}"',
                      'a cereal box with the brand name "{text}"', 'a coffee bag labeled "{text}"',
                      'a bar of soap wrapped in paper printed with "{text}"', 'a tin of tea labeled "{text}"',
                      'a hot sauce bottle with a label reading "{text}"',
                      'a chocolate bar wrapper printed with "{text}"', 'a juice carton labeled "{text}"',
                      'a cardboard shipping box stamped "{text}"',
                      'a jar of jam with a handwritten label saying "{text}"'],
            texts=["Wild Honey", "Cold Brew", "Hot Sauce No. 7", "Extra Virgin Olive Oil", "MORNING OATS",
                   "Dark Roast", "Lavender & Sage", "Strawberry Jam", "FRAGILE", "Green Tea", "SEA SALT",
                   "Orange Juice", "Reserve 2019", "Dark Chocolate 70%"],
            settings=["on a kitchen shelf", "on a rustic wooden table", "in a supermarket aisle",
                      "on a clean white background", "next to fresh ingredients", "on a marble counter",
                      "in a gift basket", "on a farmers market stall", "in soft window light on a sill",
                      "among scattered coffee beans", "on a pastel colored backdrop", "on a picnic blanket"],
            details=["The label text is sharp, centered and easy to read",
                     "Small print lists the ingredients below the name",
                     "The packaging has a clean, modern design", "A hand-drawn illustration decorates the label",
                     "Condensation drops cover the surface", "Every letter on the label is crisp and legible",
                     "The label wrinkles slightly where it wraps around", "A small logo sits above the product name",
                     "The design uses earthy colors and kraft paper",
                     "Matching products stand slightly out of focus behind it"],
            mediums=["A product photograph of", "A packaging design mockup of"]),
    },
}
SUBCLASSES = [(sup, sub) for sup, subs in PROMPT_TAXONOMY.items() for sub in subs]

# Shared pools. A sub-class's own mediums / lights, when it has them, are picked half of the time.
STYLE_POOLS = dict(
    mediums=["A photograph of", "A cinematic photo of", "A 35mm film photograph of", "A high-resolution photo of",
             "An oil painting of", "A watercolor painting of", "A detailed digital illustration of", "A 3D render of",
             "An anime-style illustration of", "A gouache painting of", "A Polaroid photo of",
             "A colored pencil drawing of"],
    cameras=["eye-level shot with a shallow depth of field", "wide-angle shot from a low angle",
             "overhead view looking straight down", "telephoto shot with compressed perspective",
             "close-up with fine detail", "centered, symmetrical composition",
             "rule-of-thirds composition with open space", "aerial view from high above",
             "three-quarter view at a slight angle", "medium shot framed by foreground elements",
             "wide establishing shot", "tilted angle with dynamic diagonal lines"],
    lights=["golden hour sunlight", "soft overcast light", "dramatic side lighting", "cool blue-hour twilight",
            "warm candlelight", "bright midday sun with crisp shadows", "soft morning light",
            "colorful neon reflections", "backlighting with a glowing rim", "diffused window light",
            "moody low-key lighting", "dappled light through leaves"],
    palettes=["muted earth tones", "vibrant saturated colors", "a soft pastel palette", "a warm amber palette",
              "cool blues and greens", "teal and orange color grading", "rich jewel tones", "a calm, serene mood",
              "a nostalgic, slightly faded look", "a moody, mysterious atmosphere", "a cheerful, playful mood",
              "natural, true-to-life colors"],
    finishes=["Highly detailed and sharp", "Intricate textures, crisp focus", "Clean, balanced composition",
              "Rich detail from foreground to background", "Professional quality, no clutter"],
)
PROMPT_LENGTH = (200, 350)  # characters: the bulk of the target range


def builtin_category(index: int) -> tuple[str, str]:
    """(super-class, sub-class) of built-in prompt `index`: the 17 sub-classes take turns."""
    return SUBCLASSES[index % len(SUBCLASSES)]


def compose_prompt(rng: random.Random, spec: dict) -> str:
    """One prompt: '<medium> <subject> <setting>. <detail>. [<detail>.] <camera>, <light>, <palette>. [<finish>.]',
    optional sentences added while the prompt is shorter than a target length drawn in the 200-350 range."""
    def pick(pool):
        own = spec.get(pool)
        return rng.choice(own if own and rng.random() < 0.5 else STYLE_POOLS[pool])

    subject = rng.choice(spec["subjects"])
    if "{text}" in subject:
        subject = subject.format(text=rng.choice(spec["texts"]))
    core = f"{pick('mediums')} {subject} {rng.choice(spec['settings'])}."
    first, second = (d + "." for d in rng.sample(spec["details"], 2))
    camera = rng.choice(STYLE_POOLS["cameras"])
    look = f"{camera[0].upper()}{camera[1:]}, {pick('lights')}, {rng.choice(STYLE_POOLS['palettes'])}."
    finish = rng.choice(STYLE_POOLS["finishes"]) + "."
    target = rng.randint(PROMPT_LENGTH[0] + 20, PROMPT_LENGTH[1] - 20)
    sentences = [core, first, look]
    for extra, where in ((second, 2), (finish, None)):
        longer = sentences[:where] + [extra] + (sentences[where:] if where is not None else [])
        if len(" ".join(sentences)) < target and len(" ".join(longer)) <= PROMPT_LENGTH[1]:
            sentences = longer
    return " ".join(sentences)


def builtin_prompts(n: int) -> list[str]:
    """n distinct prompts over PROMPT_TAXONOMY, the same for the same n, and builtin_prompts(k) is a prefix of
    builtin_prompts(n) for k < n: prompt i comes from its own seeded generator (redrawn if it repeats one before it)."""
    prompts, seen = [], set()
    for index in range(n):
        super_class, sub_class = builtin_category(index)
        rng = random.Random(index)
        prompt = compose_prompt(rng, PROMPT_TAXONOMY[super_class][sub_class])
        while prompt in seen:
            prompt = compose_prompt(rng, PROMPT_TAXONOMY[super_class][sub_class])
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------------------

PROMPT_COLUMNS = ("prompt", "text", "caption")


def prompt_column(columns, where: str) -> str:
    column = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        raise SystemExit(f"{where}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}, found "
                         f"{sorted(columns) or 'none'}")
    return column


def read_prompts(spec: str) -> list[str]:
    """--prompts: builtin:N, a .jsonl / .csv file with a prompt column, or a text file with one prompt per line."""
    if spec.startswith("builtin:"):
        count = spec.removeprefix("builtin:")
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--prompts {spec}: builtin:N needs a positive whole number N, e.g. builtin:10000")
        return builtin_prompts(int(count))
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--prompts {spec}: cannot read it ({e}). Pass a UTF-8 text file (one prompt per line), "
                         f"a .jsonl or .csv file with a {'/'.join(PROMPT_COLUMNS)} column, or builtin:N") from None
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"--prompts {spec}, line {number}: not valid JSON ({e})") from None
            row = row if isinstance(row, dict) else {}
            prompts.append(str(row[prompt_column(row, f'--prompts {spec}, line {number}')]))
    elif path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            column = prompt_column(reader.fieldnames or [], f"--prompts {spec}")
            prompts = [row[column] or "" for row in reader]
        except csv.Error as e:
            raise SystemExit(f"--prompts {spec}: not a readable CSV file ({e})") from None
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {spec}: it holds no prompt (empty, or only blank lines / blank prompt cells)")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Settings: the source's own sampling defaults, validated inputs, the corpus fingerprint
# ----------------------------------------------------------------------------------------------------------------

NEGATIVE_PROMPT = ""
# The settings that decide what the images are; a rerun into the same --out must match them all.
CORPUS_KEYS = ("source", "prompts_sha256", "num_prompts", "seeds", "seed", "width", "height", "steps", "cfg",
               "shift", "dtype")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True,
                        help="the source Z-Image repo root (transformer/, text_encoder/, tokenizer/, vae/, scheduler/), "
                             "e.g. a download of Tongyi-MAI/Z-Image-Turbo")
    parser.add_argument("--prompts", required=True,
                        help="builtin:N (N prompts composed over the paper's 4 super-classes / 17 sub-classes; "
                             "builtin:10000 is the paper's count), a text file with one prompt per line (blank lines "
                             "skipped), or a .jsonl / .csv file with a prompt, text or caption column")
    parser.add_argument("--out", required=True, help="output folder; rerun the same command to resume it")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt, each from its own seed (paper: 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: image j of prompt i uses seed + i * seeds + j")
    parser.add_argument("--res", type=int, default=1024,
                        help="square image size in pixels, a multiple of 16 (8x VAE x 2x2 latent patch); paper: 1024")
    parser.add_argument("--width", type=int, help="image width, overrides --res (a multiple of 16)")
    parser.add_argument("--height", type=int, help="image height, overrides --res (a multiple of 16)")
    parser.add_argument("--steps", type=int,
                        help="Euler steps. Default from the source, decided by its scheduler shift: shift 3 "
                             "(Z-Image-Turbo) -> 8, any other (Z-Image base, 6) -> 50")
    parser.add_argument("--cfg", type=float,
                        help="classifier-free guidance w in Z-Image's convention pos + w * (pos - neg) with the "
                             "empty negative prompt (guidance 1 + w); 0 = off. Default from the source, like "
                             "--steps: Turbo -> 0, base -> 4")
    parser.add_argument("--shift", type=float,
                        help="sigma shift of the sampler; default: the source's scheduler/scheduler_config.json")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per DiT batch. 1 (default) keeps every image bit-identical whatever the batching, "
                             "rank count or resume point; at 1024^2 one image is already a 4096-token DiT pass. Larger "
                             "helps small sizes, but images then depend on their batch companions in the last bits "
                             "(bf16 on GPU: up to 1 level on a few percent of pixels)")
    parser.add_argument("--no-features", dest="features", action="store_false",
                        help="do not cache the prompts' text features in features/ (training then has to run the "
                             "text encoder itself)")
    parser.add_argument("--device", help="torch device; default cuda if available (cuda:LOCAL_RANK under torchrun), "
                                         "else cpu")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="DiT and text encoder precision; auto = bf16 on cuda, fp32 on cpu. The VAE always runs "
                             "in fp32, as in the official code")
    return parser.parse_args(argv)


def check_source(src: Path) -> tuple[float, int]:
    """(scheduler shift, caption feature width) of a Z-Image repo root, reading only configs and headers."""
    if not src.is_dir():
        raise SystemExit(f"--src {src}: not a folder; pass a Z-Image repo root such as a download of "
                         "Tongyi-MAI/Z-Image-Turbo")
    missing = [f"{name}/" for name in ("transformer", "text_encoder", "vae", "scheduler") if not (src / name).is_dir()]
    if missing:
        raise SystemExit(f"--src {src} is not a Z-Image repo: it has no {', '.join(missing)}. Pass the repo root that "
                         "holds transformer/, text_encoder/, tokenizer/, vae/ and scheduler/ (the published layout)")
    try:
        checkpoint = model.open_dit_checkpoint(src)
        model.vae_naming(model.safetensors_shapes(model.safetensors_files(src / "vae")))
        scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    except (model.CheckpointError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--src {src}: {e}") from None
    if checkpoint.cfg.pixel_head:
        raise SystemExit(f"--src {src} is an L2P pixel model; synth.py generates with the latent source model")
    if "shift" not in scheduler:
        raise SystemExit(f"--src {src}: scheduler/scheduler_config.json has no shift; pass --shift")
    return float(scheduler["shift"]), checkpoint.cfg.cap_feat_dim


def pick_device(name: str | None, local_rank: int) -> torch.device:
    """--device, by default cuda if there is one; a bare "cuda" under torchrun means this process's GPU."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise SystemExit(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible here; pass --device cpu")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def resolve_settings(args, device: torch.device) -> tuple[dict, list[str], int]:
    """(corpus settings, prompts, caption feature width) from the arguments; SystemExit on anything invalid."""
    width, height = args.width or args.res, args.height or args.res
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise SystemExit(f"image size {width}x{height}: width and height must be positive multiples of 16 (the "
                         "8x VAE times the 2x2 latent patch); e.g. --res 1024, or --width 1216 --height 832")
    for flag, value, least in (("--seeds", args.seeds, 1), ("--seed", args.seed, 0),
                               ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1), ("--cfg", args.cfg, 0)):
        if value is not None and value < least:
            raise SystemExit(f"{flag} {value}: must be at least {least}")
    if args.shift is not None and args.shift <= 0:
        raise SystemExit(f"--shift {args.shift}: must be positive (Z-Image-Turbo uses 3, Z-Image 6)")
    src = Path(args.src).resolve()
    source_shift, cap_dim = check_source(src)
    prompts = read_prompts(args.prompts)
    preset = model.source_sampler_settings(src)  # Turbo (shift 3): 8 steps, no CFG; base (shift 6): 50, w = 4
    settings = dict(source=src.name, prompts_sha256=hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                    num_prompts=len(prompts), seeds=args.seeds, seed=args.seed, width=width, height=height,
                    steps=args.steps or preset["steps"],
                    cfg=float(preset["guidance"] - 1 if args.cfg is None else args.cfg),
                    shift=float(args.shift or source_shift),
                    dtype="bf16" if args.dtype == "bf16" or args.dtype == "auto" and device.type == "cuda" else "fp32")
    return settings, prompts, cap_dim


def check_corpus(out: Path, settings: dict, extra: dict, write: bool) -> None:
    """Refuse an --out that holds a corpus made with other settings; record the settings of a new one."""
    path = out / "synth_config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path} is unreadable ({e}); pass a new --out") from None
        changed = [f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in CORPUS_KEYS if old.get(k) != settings[k]]
        if changed:
            raise SystemExit(f"--out {out} holds a corpus made with other settings ({'; '.join(changed)}). Rerun with "
                             "its settings to resume it, or pass a new --out")
    elif write:
        atomic_write(path, lambda f: f.write(json.dumps({**settings, **extra}, indent=2).encode()))


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic writes, and the "is it done" checks a resume relies on
# ----------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """write(file) into a temp file next to `path`, then rename: `path` is either absent, old, or complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def image_name(prompt_index: int, seed_index: int) -> str:
    return f"images/{prompt_index:06d}_s{seed_index}.png"


def feature_name(key: str) -> str:
    """key: a prompt index as 6 digits, or 'negative' for the negative prompt."""
    return f"features/{key}.safetensors"


def png_done(path: Path, width: int, height: int) -> bool:
    """True if the image is there under its final name, decodes completely and has the corpus size."""
    if not path.exists():
        return False
    try:
        with Image.open(path) as image:
            image.load()
            return image.mode == "RGB" and image.size == (width, height)
    except Exception:  # whatever makes it unreadable (truncated, not a PNG, bad CRC), it is not done
        return False


def load_features(path: Path, prompt: str, dim: int) -> torch.Tensor | None:
    """The cached [L, dim] bf16 features if the file loads and was made from this prompt, else None."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("prompt") != prompt:
                return None
            cap = f.get_tensor("cap")
    except Exception:  # whatever makes it unreadable (torn, not safetensors, no "cap"), it is not done
        return None
    return cap if cap.dtype == torch.bfloat16 and cap.ndim == 2 and cap.shape[1] == dim and len(cap) else None


def write_grid(out: Path, files: list[str], columns: int = 8, thumb: int = 128) -> None:
    """grid.png: thumbnails of `files` (paths under out), `columns` per row."""
    images = []
    for name in files:
        with Image.open(out / name) as image:
            images.append(image.convert("RGB"))
    width = min(thumb, images[0].width)
    height = round(width * images[0].height / images[0].width)
    columns = min(columns, len(images))
    grid = Image.new("RGB", (columns * width, -(-len(images) // columns) * height))
    for n, image in enumerate(images):
        grid.paste(image.resize((width, height), Image.LANCZOS), ((n % columns) * width, (n // columns) * height))
    atomic_write(out / "grid.png", lambda f: grid.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

GRID_IMAGES = 32
# Ranks meet at the end and wait for the slowest; after a resume the remaining work can be very uneven.
FINAL_BARRIER_TIMEOUT = timedelta(hours=24)


def rank_jobs(num_jobs: int, rank: int, world: int) -> range:
    """Job k = (prompt k // seeds, seed index k % seeds) belongs to rank k % world."""
    return range(rank, num_jobs, world)


def image_seed(settings: dict, prompt_index: int, seed_index: int) -> int:
    return settings["seed"] + prompt_index * settings["seeds"] + seed_index


def encode_missing(src: Path, wanted: dict[str, str], write: set[str], out: Path, settings: dict, device, dtype,
                   show: bool) -> dict[str, torch.Tensor]:
    """Encode the prompts `wanted` (key -> prompt) with the source's text encoder, one prompt at a time: each
    prompt's rows then do not depend on which other prompts a rank happens to encode (they would in the last bits
    with padding). Keys in `write` are cached to features/. Returns key -> [L, D] bf16 on cpu."""
    encoder = model.load_text_encoder(src, device=device, dtype=dtype)
    features = {}
    for key, prompt in tqdm(wanted.items(), desc="encoding prompts", unit="prompt", disable=not show):
        cap, mask = encoder.encode([prompt])
        features[key] = cap[0, mask[0]].to(torch.bfloat16).cpu()  # bf16: what the cache holds and training reads
        if key in write:
            model.write_safetensors(out / feature_name(key), {"cap": features[key]},
                                    metadata={"prompt": prompt, "source": settings["source"]})
    encoder.release()  # the DiT needs the memory next
    return features


def gather_features(out: Path, src: Path, prompts: list[str], mine: list, pending: list, settings: dict,
                    cache: bool, cap_dim: int, rank: int, device, dtype, show: bool) -> tuple[dict, int]:
    """The features the pending images need (key -> [L, D] bf16 on cpu), and how many prompts had to be encoded.

    This rank also owns cache files: a prompt's, when it owns the prompt's first image; the negative prompt's on
    rank 0. Files that load are used; the rest is encoded, and the text encoder is released before the DiT loads.
    """
    texts = {f"{i:06d}": prompts[i] for i in range(len(prompts))} | {"negative": NEGATIVE_PROMPT}
    guided = settings["cfg"] > 0
    needed = {f"{i:06d}" for i, _ in pending} | ({"negative"} if guided and pending else set())
    owned = set()
    if cache:
        owned = {f"{i:06d}" for i, j in mine if j == 0} | ({"negative"} if guided and rank == 0 else set())
    features, write = {}, set()
    for key in sorted(needed | owned):
        cap = load_features(out / feature_name(key), texts[key], cap_dim)
        if cap is None and key in owned:
            write.add(key)
        if cap is not None and key in needed:
            features[key] = cap
    to_encode = {key: texts[key] for key in sorted((needed - features.keys()) | write)}
    if to_encode:
        encoded = encode_missing(src, to_encode, write, out, settings, device, dtype, show)
        features.update({key: encoded[key] for key in needed - features.keys()})
        del encoded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return features, len(to_encode)


def write_metadata(out: Path, prompts: list[str], settings: dict) -> list[dict]:
    """metadata.jsonl from the images on disk, sorted by prompt index then seed index; returns its rows."""
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(settings["seeds"]):
            if (out / image_name(i, j)).exists():
                row = dict(file_name=image_name(i, j), prompt=prompt, seed=image_seed(settings, i, j),
                           source=settings["source"], steps=settings["steps"], cfg=settings["cfg"],
                           shift=settings["shift"], width=settings["width"], height=settings["height"])
                if (out / feature_name(f"{i:06d}")).exists():
                    row["features"] = feature_name(f"{i:06d}")
                rows.append(row)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(out / "metadata.jsonl", lambda f: f.write(lines.encode()))
    return rows


def make_images(out: Path, src: Path, prompts: list[str], pending: list, features: dict, settings: dict,
                batch_size: int, device, dtype, show: bool, world: int) -> int:
    """Generate and write the pending images, batch by batch; returns how many were written. PNG encoding runs in
    background threads while the GPU works on the next batch."""
    if not pending:
        return 0
    dit = model.load_model(src, device=device, dtype=dtype)
    vae = model.load_vae(src, device=device, dtype=torch.float32)
    neg = features.get("negative")
    written, saving = 0, deque()
    with ThreadPoolExecutor(2) as writer, tqdm(total=len(pending), desc=f"generating (rank 0 of {world})",
                                               unit="img", disable=not show) as bar:
        for b in range(0, len(pending), batch_size):
            batch = pending[b:b + batch_size]
            caps = [features[f"{i:06d}"][None] for i, _ in batch]
            cap, mask = model.cat_captions(caps, [torch.ones(1, c.shape[1], dtype=torch.bool) for c in caps])
            seeds = [image_seed(settings, i, j) for i, j in batch]
            neg_cap = neg_mask = None
            if settings["cfg"] > 0:
                neg_cap = neg[None].expand(len(batch), -1, -1)
                neg_mask = torch.ones(len(batch), len(neg), dtype=torch.bool)
            images = model.generate(dit, cap, mask, seeds, settings["height"], settings["width"], settings["steps"],
                                    settings["shift"], guidance=1 + settings["cfg"], neg_cap=neg_cap,
                                    neg_mask=neg_mask, vae=vae)
            for (i, j), seed, pixels in zip(batch, seeds, to_uint8(images)):
                text = dict(prompt=prompts[i], seed=seed, steps=settings["steps"], cfg=settings["cfg"],
                            shift=settings["shift"], source=settings["source"], software="l2p synth.py")
                saving.append(writer.submit(save_png, out / image_name(i, j), pixels, text))
            bar.update(len(batch))
            while saving and (saving[0].done() or len(saving) > 2 * batch_size):  # bounded, and errors surface
                saving.popleft().result()
                written += 1
        while saving:
            saving.popleft().result()
            written += 1
    return written


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_flush_denormal(True)  # CPU: subnormal floats are many times slower (a toy training step: 1 s vs 0.2 s)
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    settings, prompts, cap_dim = resolve_settings(args, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[settings["dtype"]]
    out, src = Path(args.out), Path(args.src).resolve()
    for folder in (out / "images", out / "features"):
        folder.mkdir(parents=True, exist_ok=True)
    # Every rank checks (same answer everywhere, before any rank can block on another); rank 0 records a new corpus.
    check_corpus(out, settings, dict(source_path=str(src), prompts=args.prompts), write=rank == 0)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=FINAL_BARRIER_TIMEOUT)
    show = rank == 0
    n_seeds, width, height = settings["seeds"], settings["width"], settings["height"]

    # 1. What is left: this rank's images that are not on disk in full.
    mine = [divmod(k, n_seeds) for k in rank_jobs(len(prompts) * n_seeds, rank, world)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PNG decoding releases the GIL
        done = list(tqdm(pool.map(lambda job: png_done(out / image_name(*job), width, height), mine), total=len(mine),
                         desc="checking images", unit="img", disable=not show))
    pending = [job for job, ok in zip(mine, done) if not ok]

    # 2. Text features, then the text encoder is gone.
    features, encoded = gather_features(out, src, prompts, mine, pending, settings, args.features, cap_dim, rank,
                                        device, dtype, show)

    # 3. The images.
    generate_start = time.time()
    written = make_images(out, src, prompts, pending, features, settings, args.batch_size, device, dtype, show, world)
    if world > 1:
        print(f"rank {rank}/{world}: {written} images written, {len(mine) - len(pending)} already done, "
              f"{encoded} prompts encoded, {time.time() - generate_start:.1f} s generating")

    # 4. Once every rank is done, rank 0 rebuilds metadata.jsonl and grid.png from what is on disk.
    counts = torch.tensor([written, len(mine) - len(pending), encoded], device=device)
    if world > 1:
        dist.all_reduce(counts)  # also the meeting point: it returns once every rank has finished its images
        dist.barrier()  # no rank tears gloo down while a peer is still finishing the reduction (an exit-time abort)
        dist.destroy_process_group()
    written, skipped, encoded = counts.tolist()
    summary = dict(written=written, skipped=skipped, encoded=encoded, seconds=time.time() - start)
    if rank != 0:
        return summary
    for folder in (out, out / "images", out / "features"):
        for tmp in folder.glob(".*.tmp"):  # a killed run's partial writes; every rank has finished its own
            tmp.unlink(missing_ok=True)
    rows = write_metadata(out, prompts, settings)
    if rows:
        write_grid(out, [row["file_name"] for row in rows[:GRID_IMAGES]])
    total = len(prompts) * n_seeds
    print(f"{out}: {len(rows)}/{total} images ({written} written now, {skipped} already done), {encoded} prompts "
          f"encoded, {summary['seconds']:.1f} s, {written / summary['seconds']:.2f} images/s overall; "
          f"metadata.jsonl, grid.png")
    return summary | dict(images=len(rows))


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Every file is written and the process group destroyed, yet gloo's worker threads can still abort the
        # interpreter's teardown (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291),
        # turning a finished run into a failed exit code. Leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
