"""The built-in `shapes` world: coloured shapes on textured backgrounds, deterministic from a seed.

Submodules: `config` (constants, `ShapesConfig`, `image_seed`), `render` (the plain world's
images and labels), `forms` (the forms world), `world` (`generate`, `read_world`, captions,
`WORLDS`, `main`).

Every image holds 1-3 objects, each a shape from `SHAPES` in a colour from `COLOURS`, with a
size (`radius`, half the width of the object's bounding box, in px) and an integer centre. Labels
are known per image (which concepts are present), per object (`objects.csv`) and per pixel (the
mask: 0 = background, i = object i). This is the ground truth the SAE features are judged against.

`generate(out_dir, cfg)` writes the layout every later stage reads:

    <out_dir>/images/<split>/<image_id:05d>.png   RGB PNG
    <out_dir>/masks/<split>/<image_id:05d>.png    8-bit grey PNG, 0 = background, i = object i
    <out_dir>/images.csv    image_id,split,image,mask,labels  (labels: ';'-joined sorted concepts)
    <out_dir>/objects.csv   image_id,object,shape,colour,radius,cx,cy
    <out_dir>/world.json    the config, the concept vocabulary, counts
    <out_dir>/captions.csv  image_id,caption  (the forms world only)

(The forms world, below, adds columns to objects.csv and mask values for outlines' insides.)

Determinism: image `i` is drawn from its own generator, seeded by the child `i` of
`SeedSequence(cfg.seed)` (`image_seed`), so any image can be regenerated alone with
`render_image(image_seed(cfg.seed, i), cfg)`. Pixels are computed with integer draws and
+ - * / sqrt only (no sin/exp, no normal draws, no BLAS), which IEEE 754 rounds the same on every
CPU; PNGs are written by PIL at a fixed compression level with no metadata chunks, so the same
config gives the same bytes (with the Pillow build pinned in constraints.txt).

Learnability (FINDINGS.md: a prototype ViT learned shape slowly): objects are large (radius
12-18 px on 64 px, i.e. 3-4.5 patches of 8 px across), upright, with distinct silhouettes (a
full disc, a full box with sharp corners, a pointed apex, a thin-armed cross with concave
corners); size varies more than area differs between shapes (circle 3.1 r^2, square 4 r^2,
triangle 2 r^2, cross 2 r^2), so area alone does not tell the shape; occlusion is capped so
each object keeps most of its silhouette.

**The forms world** (`FormsConfig`, `saev shapes --world forms --out data/forms`): the same
backgrounds, shapes and colours, but each object is drawn in one of `FORMS`, uniformly:

    filled   the default world's object (a red circle)
    outline  the same silhouette, only its `outline_width` px border in the colour (inside: background)
    word     one concept (uniform over the 8) written in Pillow's bundled FreeType font
             (`ImageFont.load_default(size=font_size)`, no download) in neutral grey ink, so a
             word carries exactly one concept: "red" in dark grey is the concept red, not a colour

Labels (`FORMS_VOCABULARY`, 35 names, plain ASCII with no quote, space or "@": they are SQL
string literals, YAML scalars, stats-table rows and MLflow metric-name parts as they are):

    circle ... yellow   the 8 plain concepts, in any form (what a cross-form feature detects)
    circle:word ...     "<concept>:<form>", 24 form-qualified labels (`form_label`; in SQL
                        split_part(label, ':', 1) is the concept, split_part(label, ':', 2) the form)
    filled outline word the 3 form labels: some object of that form is present

An object carries its concepts, each with its form, and its form: a red circle outline is
{circle, red, circle:outline, red:outline, outline}; the word "square" is {square,
square:word, word}. images.csv's `labels` is the union over the image's objects. objects.csv has
one row per mask value: it gains form, word, font_size, the part's box x0,y0,x1,y1, its `labels`
(';'-joined; what `data.load_records` gives as the mask value's labels, hence the patch labels),
`part` and `part_of` (`PARTS`). A filled object or a word is one part, "whole"; an outline is
two (`FORMS_VERSION` 2): its ink, the drawn line, with the object's number and all its labels,
and its inside (the silhouette minus the ink: background), numbered after all the objects, with
colour "" and so only the shape's labels {circle, circle:outline, outline}. A patch then carries
an outline's colour only where its ink is the mask value covering most of the patch, while the
inside keeps the shape. Measured on the default config (5000 images, 64 px, 8-px patches): of
the 27,580 patches an outline covered most, all carried its colour before; now 12,777 (46%) do;
13,308 are more inside than ink; 1,424 (5%), where neither part alone outweighs the background,
carry no label, the shape's included (patch labels vote per mask value). Placement, occlusion,
counts and captions treat an outline as one object (`whole_objects`: the rows not an inside). A
word's mask is its box (its ink's bounding box plus 1 px, at least 10 px tall, so some 8-px patch
row is mostly box: every word labels at least one patch); objects are opaque within their
silhouette or box, and no object may cover any of a word's box. captions.csv holds
one caption per image ("a red circle, an outline of a blue cross and the word square"; see
`caption`); `read_captions(data_dir)` reads it, or builds captions from objects.csv for a world
without one. The image stays 64 px with 8-px patches: the eight words at 11-13 px are 18-45 px
wide with an x-height of 6-7 px (one patch row, 3-6 patches across), legible in the images, and
every downstream stage (backbones, extraction, SAEs, stats) costs what it costs on today's world.
"""

# ruff: noqa: F401  (re-exports: the public names of saev_core.shapes)
from .config import (
    BACKGROUNDS,
    BASE_RGB,
    CAPTIONS_CSV,
    COLOURS,
    CONCEPTS,
    CROSS_HALF_WIDTH,
    EMPTY_CAPTION,
    FORM_SEPARATOR,
    FORMAT,
    FORMS,
    FORMS_OBJECT_COLUMNS,
    FORMS_VERSION,
    OBJECT_COLUMNS,
    OUTPUTS,
    PARTS,
    SHAPES,
    SPLITS,
    SQUARE_HALF_SIDE,
    STRIPE_DIRECTIONS,
    WORD_MARGIN,
    WORD_MIN_HEIGHT,
    ShapesConfig,
    cfg_name,
    image_seed,
)
from .forms import (
    FORM_LABELS,
    FORMS_VOCABULARY,
    FormsConfig,
    form_label,
    outline_ink,
    render_forms_image,
)
from .render import (
    object_labels,
    patch_labels,
    patch_object_ids,
    render_image,
    shape_mask,
    whole_objects,
)
from .world import (
    WORLDS,
    caption,
    generate,
    main,
    object_phrase,
    read_captions,
    read_world,
)
