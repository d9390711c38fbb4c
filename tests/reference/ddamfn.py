"""Independent PyTorch reference of DDAMFN, NCHW: built from the DDAMFN spec
(shared/specs/ddamfn.md), with the same layers, parameter names and shapes as the official
`DDAMNet` forward, so its state_dict stands in for an official checkpoint.

`RefDDAMNet(table)` builds a network from a stage table (`OFFICIAL_TABLE`, or `table(trunk)` of
a port's trunk); `reference(table, seed)` is an eval-mode one with random BatchNorm and PReLU.
Test-only (tests/test_ddamfn.py, benchmarks/torch_ddamfn.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

# The spec's stage table: (width, (G, kernels, splits) of the stride-2 block, residual blocks,
# (G, kernels, splits) of the residual blocks).
OFFICIAL_TABLE = (64, 512, [
    (64, (128, [3, 5, 7], [64, 32, 32]), 9, (128, [3, 5], [96, 32])),
    (128, (256, [3, 5, 7], [128, 64, 64]), 16, (256, [3, 5], [192, 64])),
    (256, (1024, [3, 5, 7, 9], [256] * 4), 6, (512, [3, 5, 7], [172, 170, 170])),
])


def table(trunk):
    """The stage table of a trunk (`abaw_jax.models.ddamfn.Trunk`, read by its attributes)."""
    def mix(m):
        return m.groups, list(m.kernels), list(m.splits)
    return trunk.stem, trunk.width, [(lv.width, mix(lv.down), lv.blocks, mix(lv.residual))
                                     for lv in trunk.levels]


def h_swish(x):
    return x * F.relu6(x + 3) / 6


class RefBlock(nn.Module):
    """conv -> BN (-> PReLU when act): the reference's Conv_block / Linear_block."""

    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act
        if act:
            self.prelu = nn.PReLU(cout)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.prelu(x) if self.act else x


class RefCoordTail(nn.Module):
    def __init__(self, c):
        super().__init__()
        mip = max(8, c // 32)
        self.conv1 = nn.Conv2d(c, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv2 = nn.Conv2d(mip, c, 1)
        self.conv3 = nn.Conv2d(mip, c, 1)

    def maps(self, x_h, x_w):  # (n, c, h, 1), (n, c, 1, w)
        h = x_h.shape[2]
        y = h_swish(self.bn1(self.conv1(torch.cat([x_h, x_w.permute(0, 1, 3, 2)], dim=2))))
        y_h, y_w = torch.split(y, [h, y.shape[2] - h], dim=2)
        return self.conv2(y_h).sigmoid(), self.conv3(y_w.permute(0, 1, 3, 2)).sigmoid()


class RefCA(RefCoordTail):
    def forward(self, x):
        a_h, a_w = self.maps(x.mean(3, keepdim=True), x.mean(2, keepdim=True))
        return x * a_w * a_h


class RefMDConv(nn.Module):
    def __init__(self, c, kernels, splits, stride):
        super().__init__()
        self.splits = splits
        self.mixed_depthwise_conv = nn.ModuleList(
            nn.Conv2d(s, s, k, stride, k // 2, groups=s, bias=False)
            for k, s in zip(kernels, splits, strict=True))
        self.bn = nn.BatchNorm2d(c)  # never applied
        self.prelu = nn.PReLU(c)  # never applied

    def forward(self, x):
        parts = torch.split(x, self.splits, dim=1)
        return torch.cat([f(p) for f, p in zip(self.mixed_depthwise_conv, parts, strict=True)], 1)


class RefMix(nn.Module):
    def __init__(self, cin, cout, mix, stride, residual):
        super().__init__()
        groups, kernels, splits = mix
        self.conv = RefBlock(cin, groups)
        self.conv_dw = RefMDConv(groups, kernels, splits, stride)
        self.CA = RefCA(groups)
        self.project = RefBlock(groups, cout, act=False)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.CA(self.conv_dw(self.conv(x))))
        return x + y if self.residual else y


class RefResidual(nn.Module):
    def __init__(self, c, mix, blocks):
        super().__init__()
        self.model = nn.Sequential(*[RefMix(c, c, mix, 1, True) for _ in range(blocks)])

    def forward(self, x):
        return self.model(x)


class RefHeadAtt(RefCoordTail):
    def __init__(self, c, s):
        super().__init__(c)
        self.Linear_h = RefBlock(c, c, (1, s), groups=c, act=False)
        self.Linear_w = RefBlock(c, c, (s, 1), groups=c, act=False)
        self.Linear = RefBlock(c, c, s, groups=c, act=False)  # never applied

    def forward(self, x):
        a_h, a_w = self.maps(self.Linear_h(x), self.Linear_w(x))
        return a_w.expand_as(x) * a_h.expand_as(x)


class RefHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.CoordAtt = RefHeadAtt(c, 7)

    def forward(self, x):
        return self.CoordAtt(x)


class RefDDAMNet(nn.Module):
    def __init__(self, table=OFFICIAL_TABLE, num_class=8, num_head=2):
        super().__init__()
        stem, width, levels = table
        feats = [RefBlock(3, stem, 3, 2, 1), RefBlock(stem, stem, 3, 1, 1, groups=stem)]
        c = stem
        for out, down, blocks, res in levels:
            feats += [RefMix(c, out, down, 2, False), RefResidual(out, res, blocks)]
            c = out
        feats.append(RefBlock(c, width))
        self.features = nn.Sequential(*feats)
        self.num_head = num_head
        for i in range(num_head):
            setattr(self, f"cat_head{i}", RefHead(width))
        self.Linear = RefBlock(width, width, 7, groups=width, act=False)
        self.fc = nn.Linear(width, num_class)
        self.bn = nn.BatchNorm1d(num_class)  # never applied

    def forward(self, x):
        x = self.features(x)
        heads = [getattr(self, f"cat_head{i}")(x) for i in range(self.num_head)]
        y = heads[0]
        for h in heads[1:]:
            y = torch.max(y, h)
        embedding = self.Linear(x * y).flatten(1)
        return self.fc(embedding), x, heads, embedding


def reference(table, seed):
    """Eval-mode reference with random BatchNorm affine + statistics and PReLU slopes."""
    torch.manual_seed(seed)
    ref = RefDDAMNet(table)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    return ref.eval()

