"""Quality metrics that need no downloaded weights (issue 15): reconstruction (PSNR, SSIM), videos against their
captions (colour, shape, direction of the named object and its presence across frames, from the synthetic world's
own detectors), and the Fréchet distance between feature sets (FVD when the features come from a video network).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.synth import COLORS, DIRECTIONS, SHAPES
from data_pipeline.synth_detect import clip_shape, detect, direction, dominant_color

_OBJECT = re.compile(r"\b(an?) (?P<color>%s) (?P<shape>%s) (?:\w+ )?moving (?P<direction>%s)\b" % (
    "|".join(COLORS), "|".join(SHAPES), "|".join(sorted(DIRECTIONS, key=len, reverse=True))))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, C1 = 0.01^2, C2 = 0.03^2) of images (N, C, H, W) in
    [0, 1], averaged over channels and positions (valid region: no padding)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    window = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def psnr_per_frame(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(T,) PSNR in dB of videos (B, 3, T, H, W) in [-1, 1], averaged over the batch per frame."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).mean(dim=(1, 3, 4)).mean(0)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim_per_frame(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(T,) SSIM of videos (B, 3, T, H, W) in [-1, 1], averaged over the batch per frame."""
    b, c, t, h, w = x.shape
    flat = lambda v: ((v.clamp(-1, 1) + 1) / 2).transpose(1, 2).reshape(b * t, c, h, w)  # noqa: E731
    return ssim(flat(x).double(), flat(y).double()).view(b, t).mean(0).float()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); the matrix root via the symmetric form
    (S_a^(1/2) S_b S_a^(1/2))^(1/2), which has the same trace."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets of one width, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    ev, vec = np.linalg.eigh(sa)
    root_a = (vec * np.sqrt(ev.clip(min=0))) @ vec.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a).clip(min=0)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(cross).sum())


def parse_caption(caption: str) -> list[dict[str, str]]:
    """The objects a synthetic-world caption names: [{"color", "shape", "direction"}], in order."""
    return [m.groupdict() for m in _OBJECT.finditer(caption)]


def caption_scores(frames: np.ndarray, caption: str) -> dict[str, float] | None:
    """How well a video (T, H, W, 3 uint8) shows its caption's first object: colour (the dominant object colour
    for a one-object caption, else present at all), shape (most frequent over frames), direction (of motion), and
    the fraction of frames where it is present. None for a caption outside the synthetic world."""
    objects = parse_caption(caption)
    if not objects:
        return None
    want = objects[0]
    det = detect(frames, want["color"])
    seen = clip_shape(frames[det.present], want["color"])
    color_ok = dominant_color(frames) == want["color"] if len(objects) == 1 else bool(det.present.any())
    return {"color": float(color_ok), "shape": float(seen == want["shape"]),
            "direction": float(direction(det, *frames.shape[1:3]) == want["direction"]),
            "present": float(det.present.mean())}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Accuracies over videos, plus `present_90`: the fraction of videos with the object in >= 90% of frames."""
    scores = [s for s in scores if s is not None]
    if not scores:
        return {}
    out = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    out["present_90"] = float(np.mean([s["present"] >= 0.9 for s in scores]))
    out["videos"] = len(scores)
    return out


def drift_curve(generated: torch.Tensor, real: torch.Tensor) -> list[float]:
    """Per-frame mean absolute error of a generated continuation (B, 3, T, H, W) against the real one, in [0, 1]
    units: how fast image-to-video drifts from the truth."""
    t = min(generated.shape[2], real.shape[2])
    err = ((generated[:, :, :t] - real[:, :, :t]).abs() / 2).mean(dim=(0, 1, 3, 4))
    return [float(e) for e in err]


def load_feature_extractor(path: str) -> torch.jit.ScriptModule:
    """A user-supplied TorchScript video network for FVD (e.g. an I3D exported with torch.jit.trace/script):
    videos (B, 3, T, H, W) in [-1, 1] -> features (B, D). None ships here (no downloaded weights). TorchScript is
    code as well as weights: load only files you trust."""
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a loadable TorchScript module ({str(e).splitlines()[0]})") from None


@torch.no_grad()
def video_features(extractor: torch.nn.Module, videos: list[np.ndarray]) -> np.ndarray:
    """(N, D) features of uint8 videos (T, H, W, 3), one forward per video (lengths may differ)."""
    feats = []
    for v in videos:
        x = torch.from_numpy(np.ascontiguousarray(v)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        f = extractor(x)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != 1:
            raise ValueError(f"the feature extractor must return (B, D) features, got "
                             f"{getattr(f, 'shape', type(f).__name__)}")
        feats.append(f[0].double().numpy())
    return np.stack(feats)


def fvd(extractor: torch.nn.Module, generated: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Fréchet video distance: `frechet_distance` of the extractor's features of the two sets of videos."""
    return frechet_distance(video_features(extractor, generated), video_features(extractor, reference))
