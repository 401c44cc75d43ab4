"""``uvit export``: weights for the rest of the ecosystem, as our safetensors file or a diffusers folder.

A diffusers export is a folder a diffusers user can load and a Hub repo can hold as it is::

    transformer/   config.json + diffusion_pytorch_model.safetensors  (UViTModel.from_pretrained(DIR, subfolder=...))
    scheduler/     scheduler_config.json  (the diffusers scheduler closest to the recipe's sampler, its own save)
    uvit.json      the VAE reference (hub id, subfolder, scale factor), the sampling protocol, the null condition
    recipe.yaml    the resolved recipe;  README.md  the model card (recipe, parameters, steps, FID cards found)

The scheduler's ``alphas_cumprod[k]`` equal our schedule's alpha_t^2 at t = (k + 1) / N, exactly: the discrete SD
schedule is diffusers' ``scaled_linear``, and the VP-SDE is written as ``trained_betas``. Which official sampler
each scheduler reproduces, and where it differs, is in :data:`SCHEDULERS` (and on the model card).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       HeunDiscreteScheduler)

from .autoencoder import split_spec
from .build import build_schedule, parameter_count
from .checkpoint import save_weights
from .diffusers_model import UViTModel
from .errors import UvitError
from .files import write_json, write_text
from .recipe import Recipe, dump_recipe
from .registry import VAES

log = logging.getLogger(__name__)

FORMAT = "uvit-diffusers-1"
MODEL_DIR, SCHEDULER_DIR, INFO = "transformer", "scheduler", "uvit.json"


# ---------------------------------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------------------------------

def train_timesteps(recipe: Recipe) -> int:
    """N of the scheduler's grid: the discrete schedule's own, 1000 for the continuous VP-SDE."""
    d = recipe.diffusion
    return d.num_timesteps if d.formulation == "discrete" else 1000


def beta_config(recipe: Recipe) -> dict:
    """Scheduler arguments whose ``alphas_cumprod[k]`` equal our alpha_t^2 at t = (k + 1) / N."""
    d, n = recipe.diffusion, train_timesteps(recipe)
    if d.formulation == "discrete":  # betas = linspace(sqrt(start), sqrt(end), N)^2 is diffusers' scaled_linear
        return dict(num_train_timesteps=n, beta_schedule="scaled_linear", beta_start=d.beta_start,
                    beta_end=d.beta_end)
    schedule = build_schedule(recipe)  # float64 on the CPU
    ac = torch.exp(2.0 * schedule.marginal_log_alpha(torch.arange(1, n + 1, dtype=torch.float64) / n))
    betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return dict(num_train_timesteps=n, trained_betas=[float(b) for b in betas])


def _dpm_singlestep(algorithm: str):
    def make(recipe: Recipe):
        s = recipe.sample
        return DPMSolverSinglestepScheduler(**beta_config(recipe), algorithm_type=algorithm, solver_order=s.order,
                                            lower_order_final=s.fast, final_sigmas_type="sigma_min")
    return make


def _dpm_2m(recipe: Recipe):
    return DPMSolverMultistepScheduler(**beta_config(recipe), algorithm_type="dpmsolver++", solver_order=2,
                                       lower_order_final=True, final_sigmas_type="sigma_min")


def _ddim(recipe: Recipe):
    return DDIMScheduler(**beta_config(recipe), clip_sample=False, set_alpha_to_one=False)


def _ddpm(recipe: Recipe):
    return DDPMScheduler(**beta_config(recipe), clip_sample=False, variance_type="fixed_small")


def _euler(recipe: Recipe):
    return EulerDiscreteScheduler(**beta_config(recipe))


def _heun(recipe: Recipe):
    return HeunDiscreteScheduler(**beta_config(recipe))


# Flow matching (x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0): diffusers' flow-matching
# schedulers on sigma = t with shift 1 (SD3's shift would change the time grid); their timestep is 1000 t.
FLOW_NOTE = ("flow matching: diffusers' {name} on sigma = t (shift 1, timesteps = 1000 t), the probability-flow ODE "
             "of the same velocity; ")


def _flow_scheduler(recipe: Recipe):
    """(scheduler, note) for a flow model: Heun for the Heun sampler, Euler for every other sampler."""
    heun = recipe.sample.sampler == "heun"
    cls = FlowMatchHeunDiscreteScheduler if heun else FlowMatchEulerDiscreteScheduler
    note = FLOW_NOTE.format(name=cls.__name__) + ("the same steps as uvit's heun (time-uniform)." if heun else
                                                    "uvit's euler takes the same steps; for uvit's "
                                                    f"{recipe.sample.sampler} diffusers has no flow counterpart, "
                                                    "so this is Euler on the same ODE.")
    return cls(num_train_timesteps=1000, shift=1.0), note


# sampler (recipe.Sampler) -> (scheduler for a recipe, which official sampler it reproduces and where it differs)
SCHEDULERS = {
    "dpm_solver": (_dpm_singlestep("dpmsolver"),
                   "DPM-Solver (noise prediction) singlestep with DPM-Solver-fast's order list: the official VP-SDE "
                   "sampler's update rule. Differs in the time grid: diffusers spaces integer timesteps uniformly "
                   "in t and ends at t = 1/1000, the official runs space logSNR uniformly down to t = 1e-4 (about "
                   "4% relative difference on a Gaussian with exact noise prediction, 50 steps)."),
    "dpm_solver_pp": (_dpm_singlestep("dpmsolver++"),
                      "DPM-Solver++ singlestep with the fast order list (order-3 steps, lower orders last) on a "
                      "time-uniform grid ending at t = 1/N: the official discrete sampler (dpm_solver_pp.py, "
                      "method fast). Differs only in rounding the intermediate times to integer timesteps (relative "
                      "difference 2e-4 on a Gaussian with exact noise prediction, 50 steps). With the VP-SDE the "
                      "official spacing is logSNR-uniform, which this scheduler does not offer."),
    "dpm_solver_pp_2m": (_dpm_2m,
                         "DPM-Solver++(2M), multistep, first order last: the same algorithm; diffusers rounds the "
                         "time grid to integer timesteps and ends at t = 1/N."),
    "euler_maruyama": (_ddpm,
                       "DDPM ancestral sampling on the same discretised VP process: the stochastic sampler a "
                       "diffusers user runs for 1000 steps. Not the same update as the official Euler-Maruyama "
                       "(sde.py); both sample the reverse SDE."),
    "pf_ode_euler": (_ddim,
                     "DDIM (a first-order exponential integrator of the probability-flow ODE) in place of the "
                     "official Euler steps in t; the same ODE, not the same steps."),
    "euler": (_euler, "Euler on the probability-flow ODE in Karras sigmas (EulerDiscreteScheduler): the same ODE "
                      "as uvit's euler, stepped in sigma = sigma_t / alpha_t instead of t."),
    "heun": (_heun, "Heun (second order) on the probability-flow ODE in Karras sigmas (HeunDiscreteScheduler): "
                    "the same ODE as uvit's heun, stepped in sigma instead of t."),
    "ddim": (_ddim, "DDIM, eta = 0: the same update on integer timesteps ending at t = 1/N."),
}


def build_scheduler(recipe: Recipe):
    """(the diffusers scheduler for ``recipe.sample``, the note on what it reproduces)."""
    if recipe.diffusion.formulation == "flow":
        return _flow_scheduler(recipe)
    make, note = SCHEDULERS[recipe.sample.sampler]
    return make(recipe), note


# ---------------------------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------------------------

def vae_reference(recipe: Recipe) -> dict | None:
    """Where the decoder of a latent model comes from: hub id (+ subfolder) or path, and the latent scale factor."""
    if not recipe.is_latent:
        return None
    spec = recipe.data.vae or VAES["imagenet"][0]
    repo, sub = split_spec(spec)
    ref = {"scale_factor": recipe.data.scale_factor, "decode": "vae.decode(latents / scale_factor)"}
    if repo.count("/") == 1 and not Path(spec).expanduser().exists():
        return {"repo_id": repo, "subfolder": sub, **ref}
    return {"path": spec, "note": "a local VAE: upload it, or set data.vae to its hub id", **ref}


def fid_results(run_dir: Path | None) -> list[dict]:
    """``uvit fid --json`` results ({metrics, protocol}) saved anywhere under a run directory."""
    out = []
    for p in sorted(Path(run_dir).rglob("*.json")) if run_dir is not None and Path(run_dir).is_dir() else []:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict) and isinstance(data.get("protocol"), dict):
            out.append({"file": str(p.relative_to(run_dir)), **data})
    return out


def sampling_info(recipe: Recipe, model: torch.nn.Module) -> dict:
    s = recipe.sample
    info = {"sampler": s.sampler, "steps": s.steps, "order": s.order, "fast": s.fast, "guidance_w": s.cfg_scale,
            "guidance_convention": "eps_u + w (eps_c - eps_u); official U-ViT scale = w - 1"}
    if recipe.conditioning == "class":
        info["null_class_id"] = model.null_class_id
    elif recipe.conditioning == "text":
        info["null_condition"] = "the text encoder's features of the empty prompt"
        info["text_encoder"] = recipe.data.text_encoder
    return info


def model_card(recipe: Recipe, *, params: int, step: int | None, source: str, scheduler, note: str,
               vae: dict | None, results: list[dict], info: dict) -> str:
    """README.md for the Hub: what the model is, how it was trained and scored, and how to sample it."""
    m, kind = recipe.model, recipe.conditioning
    tags = ["uvit", "diffusion", "image-generation", {"class": "class-conditional", "text": "text-to-image",
                                                       "none": "unconditional-image-generation"}[kind]]
    lines = ["---", "library_name: diffusers", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {recipe.name}: {m.size or 'U-ViT'}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    lines += ["A U-ViT (Bao et al., \"All are Worth Words: A ViT Backbone for Diffusion Models\", CVPR 2023; "
              "official code [baofff/U-ViT](https://github.com/baofff/U-ViT)), written by `uvit export` of the "
              "uvit toolkit.", "",
              "| | |", "|---|---|",
              f"| model | {m.size or 'custom'}: {m.num_layers} layers, width {m.embed_dim}, {m.num_heads} heads, "
              f"patch {m.patch_size} |",
              f"| parameters | {params:,} |",
              f"| input | {m.in_chans} x {m.img_size} x {m.img_size} ({'latents' if recipe.is_latent else 'pixels'}) |",
              f"| condition | {kind}" + (f" ({m.num_classes} classes, null class {info.get('null_class_id')})"
                                         if kind == "class" else "") + " |",
              f"| training steps | {step if step is not None else 'unknown'} (batch {recipe.train.batch_size}) |",
              f"| weights | {source} |",
              f"| diffusion | {recipe.diffusion.formulation} |",
              f"| sampler (recipe) | {info['sampler']}, {info['steps']} steps, guidance w = {info['guidance_w']} |",
              f"| scheduler | `{type(scheduler).__name__}` |"]
    if vae is not None:
        where = vae.get("repo_id", vae.get("path"))
        lines.append(f"| VAE | `{where}`" + (f" (subfolder `{vae['subfolder']}`)" if vae.get("subfolder") else "")
                     + f", scale factor {vae['scale_factor']} |")
    lines += ["", f"**Scheduler.** {note}", ""]
    lines += ["## Results", ""]
    if results:
        for r in results:
            metrics = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in r["metrics"].items())
            lines += [f"- {metrics} (`{r['file']}`). Protocol:", "", "```json",
                      json.dumps(r["protocol"], indent=1, sort_keys=True, default=str), "```", ""]
    else:
        lines += ["No FID results were found with these weights (`uvit fid RUN --json RUN/fid.json` adds them).", ""]
    lines += ["## Use", "", "```python", "import torch",
              f"from diffusers import {type(scheduler).__name__}" + (", AutoencoderKL" if vae else ""),
              "from uvit_cli.diffusers_model import UViTModel  # pip install uvit", "",
              'repo = "THIS_REPO"  # or the exported folder',
              f'model = UViTModel.from_pretrained(repo, subfolder="{MODEL_DIR}").eval()',
              f'scheduler = {type(scheduler).__name__}.from_pretrained(repo, subfolder="{SCHEDULER_DIR}")',
              f"scheduler.set_timesteps({info['steps']})",
              f"x = torch.randn(4, {m.in_chans}, {m.img_size}, {m.img_size})"]
    w = info["guidance_w"]
    if kind == "class":
        lines += ["y = torch.tensor([1, 2, 3, 4])" + (f"; null = torch.full_like(y, {info['null_class_id']})"
                                                      if w != 1 else ""),
                  "for t in scheduler.timesteps:", "    with torch.no_grad():"]
        if w != 1:
            lines += ["        e_c, e_u = model(torch.cat([x, x]), t, class_labels=torch.cat([y, null])).sample.chunk(2)",
                      f"    eps = e_u + {w} * (e_c - e_u)"]
        else:
            lines += ["        eps = model(x, t, class_labels=y).sample"]
    elif kind == "text":
        lines += ["ctx, null = ...  # (B, 77, 768) CLIP features of the prompts and of the empty prompt",
                  "for t in scheduler.timesteps:", "    with torch.no_grad():",
                  "        e_c, e_u = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([ctx, null])).sample.chunk(2)",
                  f"    eps = e_u + {w} * (e_c - e_u)"]
    else:
        lines += ["for t in scheduler.timesteps:", "    with torch.no_grad():", "        eps = model(x, t).sample"]
    lines += ["    x = scheduler.step(eps, t, x).prev_sample"]
    if vae is not None:
        if "repo_id" in vae:
            sub = f', subfolder="{vae["subfolder"]}"' if vae.get("subfolder") else ""
            lines.append(f'vae = AutoencoderKL.from_pretrained("{vae["repo_id"]}"{sub})')
        lines.append(f"images = vae.decode(x / {vae['scale_factor']}).sample  # in [-1, 1]")
    else:
        lines.append("images = x.clamp(-1, 1)  # in [-1, 1]")
    lines += ["```", "", "The resolved training recipe is `recipe.yaml`; `uvit sample` and `uvit fid` take the "
              f"weights in `{MODEL_DIR}/` with `--recipe recipe.yaml`.", ""]
    return "\n".join(lines)


def export_diffusers(model, recipe: Recipe, out: str | Path, *, source: str, step: int | None = None,
                     run_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write the diffusers folder for ``model`` (a UViT built from ``recipe``); complete or absent, never partial."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UvitError(f"{out} already exists; pass --overwrite to replace it, or pick another --out")
    scheduler, note = build_scheduler(recipe)
    vae = vae_reference(recipe)
    info = {"format": FORMAT, "model": MODEL_DIR, "scheduler": SCHEDULER_DIR,
            "scheduler_class": type(scheduler).__name__, "scheduler_note": note, "vae": vae,
            "sampling": sampling_info(recipe, model), "training_steps": step, "source": source,
            "timestep_convention": "diffusers index k in [0, N) = sampler time t = (k + 1) / N"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        UViTModel.from_uvit(model, recipe).save_pretrained(str(tmp / MODEL_DIR), safe_serialization=True)
        scheduler.save_pretrained(str(tmp / SCHEDULER_DIR))
        write_json(tmp / INFO, info, indent=2)
        write_text(tmp / "recipe.yaml", dump_recipe(recipe))
        write_text(tmp / "README.md", model_card(recipe, params=parameter_count(recipe), step=step, source=source,
                                                 scheduler=scheduler, note=note, vae=vae,
                                                 results=fid_results(run_dir), info=info["sampling"]))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the diffusers folder %s (%s)", out, type(scheduler).__name__)
    return out


def export_safetensors(model, recipe: Recipe, out: str | Path, *, source: str, step: int | None = None,
                       overwrite: bool = False) -> Path:
    """Our weights file: safetensors with the resolved recipe in its metadata (what `uvit convert` writes)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UvitError(f"--out {out}: a safetensors export must end in .safetensors")
    if out.exists() and not overwrite:
        raise UvitError(f"{out} already exists; pass --overwrite to replace it, or pick another --out")
    meta = {"source": source, "kind": "ema"} | ({"step": step} if step is not None else {})
    save_weights(out, model.state_dict(), dump_recipe(recipe), **meta)
    return out


# export format (recipe.ExportFormat) -> writer
EXPORTERS = {"diffusers": export_diffusers, "safetensors": export_safetensors}
