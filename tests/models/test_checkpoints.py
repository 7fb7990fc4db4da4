"""Loading a state_dict in the authors' key layout: an independent re-creation of their module
names (from the spec), with plain nn layers, whose outputs our model must reproduce."""
import pytest
import torch
from torch import nn

from dlkunet.models import DLKUNetM, DLKUNetS, load_reference_checkpoint


class RefDWConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class RefLKA(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, dilation=3, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class RefBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.dwconv1, self.bn1 = RefDWConv(cin, cout), nn.BatchNorm2d(cout)
        self.dwconv2, self.bn2 = RefDWConv(cout, cout), nn.BatchNorm2d(cout)
        self.lka = RefLKA(cout)

    def forward(self, x):
        x = torch.relu(self.bn1(self.dwconv1(x)))
        return self.lka(torch.relu(self.bn2(self.dwconv2(x))))


class RefDown(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), RefBlock(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class RefUp(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = RefBlock(2 * cout, cout)

    def forward(self, deep, skip):
        up = self.up(deep)
        dy, dx = skip.shape[2] - up.shape[2], skip.shape[3] - up.shape[3]
        up = nn.functional.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, up], 1))


class RefOut(nn.Module):
    def __init__(self, cin, classes):
        super().__init__()
        self.conv = nn.Conv2d(cin, classes, 1)

    def forward(self, x):
        return self.conv(x)


class RefNet(nn.Module):
    """The authors' naming: inc, down1..downK, up1 (deepest)..upK, outc."""

    def __init__(self, levels, c=8, classes=4):
        super().__init__()
        widths = [c * 2 ** i for i in range(levels)]
        self.levels = levels
        self.inc = RefBlock(1, c)
        for i in range(1, levels):
            setattr(self, f"down{i}", RefDown(widths[i - 1], widths[i]))
            setattr(self, f"up{i}", RefUp(widths[levels - i], widths[levels - i - 1]))
        self.outc = RefOut(c, classes)

    def forward(self, x):
        skips = [self.inc(x)]
        for i in range(1, self.levels):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        y = skips.pop()
        for i in range(1, self.levels):
            y = getattr(self, f"up{i}")(y, skips.pop())
        return self.outc(y)


def _randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.3)


@pytest.mark.parametrize("cls,levels", [(DLKUNetS, 3), (DLKUNetM, 4)])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_reference_layout_loads_and_gives_identical_outputs(cls, levels, prefix):
    ref = RefNet(levels).eval()
    _randomise(ref)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    ours = cls(in_channels=1, num_classes=4, base_width=8).eval()
    report = load_reference_checkpoint(ours, state)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    x = torch.randn(2, 1, 29, 35)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mismatches_are_reported_by_name(tmp_path):
    ref = RefNet(3)
    state = ref.state_dict()
    del state["inc.bn1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    ours = DLKUNetS(num_classes=4, base_width=8)
    with pytest.raises(RuntimeError) as err:
        load_reference_checkpoint(ours, state)
    assert "inc.bn1.running_var" in str(err.value) and "extra.weight" in str(err.value)  # the file's names
    assert "build DLKUNet" not in str(err.value)  # same depth, width and classes: no other variant to suggest
    report = load_reference_checkpoint(ours, state, strict=False)
    assert report["missing"] == ["inc.bn1.running_var"] and report["unexpected"] == ["extra.weight"]
    path = tmp_path / "ref.pth"
    torch.save(RefNet(3).state_dict(), path)
    assert load_reference_checkpoint(DLKUNetS(num_classes=4, base_width=8), path)["missing"] == []
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_reference_checkpoint(ours, tmp_path / "nope.pth")


def test_a_deeper_file_names_its_keys_and_the_variant_that_fits():
    # Issue 17, defect 6: the authors' 4-level (M) checkpoint into DLKUNetS gave a 5,211-character
    # error listing our converted key names and no hint.
    state = {"module." + k: v for k, v in RefNet(4, c=8, classes=4).state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        load_reference_checkpoint(DLKUNetS(num_classes=4, base_width=8), state)
    text = str(err.value)
    assert "build DLKUNetM(in_channels=1, num_classes=4, base_width=8)" in text, text
    assert "module.down3.maxpool_conv.1." in text and "downs.2" not in text and "ups." not in text
    assert "up1.up.weight: file (64, 32, 2, 2) vs model (32, 16, 2, 2)" in text
    assert len(text) < 1200, len(text)
    # Other widths and class counts are named too.
    with pytest.raises(RuntimeError, match=r"build DLKUNetS\(in_channels=1, num_classes=4, base_width=8\)"):
        load_reference_checkpoint(DLKUNetS(num_classes=9, base_width=16), RefNet(3, c=8, classes=4).state_dict())
    # What the suggestion says loads.
    ours = DLKUNetM(num_classes=4, base_width=8)
    assert load_reference_checkpoint(ours, state) == {"missing": [], "unexpected": [], "mismatched": []}


def test_reference_key_inverts_convert_key():
    from dlkunet.models.checkpoints import convert_key, reference_key

    for key in RefNet(4).state_dict():
        assert reference_key(convert_key(key, 4)) == key


def test_unsafe_reference_file_is_refused_without_unpickling(tmp_path):
    from dlkunet.checkpointing import CheckpointError

    path = tmp_path / "evil.pth"
    torch.save({"inc.x": Unpicklable()}, path)
    with pytest.raises(CheckpointError, match="refused.*never unpickles") as err:
        load_reference_checkpoint(DLKUNetS(num_classes=4, base_width=8), path)
    assert "weights_only=False" not in str(err.value)


class Unpicklable:
    """Any class outside torch's allow-list: loading it would mean running its module's code."""
