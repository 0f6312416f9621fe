import numpy as np
import pytest
from PIL import Image

from conftest import make_folder, make_image
from pipeline import PipelineError, load_image, load_source


def test_folder_with_splits(folder):
    src = load_source(folder)
    assert src.name == "shapes"
    assert len(src.samples) == 2 * (12 + 6)
    s = src.samples[0]
    assert (s.id, s.label, s.split) == ("train/blue/blue_000.jpg", "blue", "train")
    assert {x.split for x in src.samples} == {"train", "val"}
    assert {x.label for x in src.samples} == {"red", "blue"}


def test_folder_without_splits(tmp_path):
    src = load_source(make_folder(tmp_path / "flat", n_train=3, n_val=1, splits=False))
    assert {s.split for s in src.samples} == {""}
    assert {s.label for s in src.samples} == {"red", "blue"}
    assert src.samples[0].id == "blue/blue_000.jpg"


def test_folder_ignores_non_images_and_hidden(folder):
    (folder / "train" / "red" / "notes.txt").write_text("x")
    (folder / "train" / "red" / ".DS_Store").write_bytes(b"x")
    assert len(load_source(folder).samples) == 36


def test_manifest(tmp_path, folder):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,split,id\n"
        f"{folder}/train/red/red_000.jpg,warm,train,a\n"
        "shapes/val/blue/blue_000.jpg,cold,val,\n"
    )
    with pytest.raises(PipelineError, match=r"m.csv:2: path '.*red_000.jpg' leaves the manifest's folder"):
        load_source(manifest)
    src = load_source(manifest, allow_outside_root=True)
    assert src.name == "m"
    assert [(s.id, s.label, s.split) for s in src.samples] == [
        ("a", "warm", "train"), ("shapes/val/blue/blue_000.jpg", "cold", "val")]
    assert src.samples[1].path == tmp_path / "shapes/val/blue/blue_000.jpg"


@pytest.mark.parametrize("text, message", [
    ("file,label\nx.jpg,a\n", "needs a 'path' column"),
    ("path,id\na.jpg,1\nb.jpg,1\n", "m.csv:3: duplicate id '1'"),
    ("path\n", "lists no images"),
    ("path\nok.jpg\n../../etc/passwd\n", "m.csv:3: path '../../etc/passwd' leaves the manifest's folder"),
    ("path\n/etc/passwd\n", "m.csv:2: path '/etc/passwd' leaves the manifest's folder"),
    ("path,split\na.jpg,train\nb.jpg,valid\n", "sample 'b.jpg': split must be one of train, val, test or empty, got 'valid'"),
])
def test_bad_manifest(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(PipelineError, match=message):
        load_source(tmp_path / "m.csv")


def test_missing_source(tmp_path):
    with pytest.raises(PipelineError, match="data source not found"):
        load_source(tmp_path / "nope")


def test_load_image_16bit_is_rescaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 40000, np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [156, 156, 156]  # 40000/257, not clipped to 255


def test_load_image_composites_alpha_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]


def test_load_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_load_image_truncated_fails_at_load(tmp_path):
    good = make_image(tmp_path / "good.jpg", (100, 100, 100), 0, size=(200, 150)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_load_image_refuses_huge_images(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="over the 10,000-pixel limit"):
        load_image(tmp_path / "big.png", max_pixels=10_000)
