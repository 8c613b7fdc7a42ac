"""Training the H-space adapter (HSPACE_SPEC §6): adapter + decoder LoRA against a teacher-encoder discriminator.

Frozen: the student UNet (SD-Turbo), the teacher UNet (SD2.1), the VAE and
the text encoder. Trained: the H-space adapter and LoRA on the student's
decoder (generator, G), and the discriminator's heads (D). One step, jitted
and data-parallel (batch split over the mesh, everything else replicated):

  z_t1 = α_t1 z0 + σ_t1 ε1 (t1 = 999; Q9: or pure noise), ẑ0 = student(z_t1, t1, τ(p), h0_r) with the adapter
  s ~ U{0..999}, ε2:  z_s = α_s z0 + σ_s ε2,  ẑ_s = α_s ẑ0 + σ_s ε2
  G: L = L_adv + 2.5 smooth-L1(ẑ0, z0) + 1.0 L_lpips,  L_adv = -Σ_k E[D_k(ẑ_s)]       (Eq. 10)
  D: Σ_k E[max(0, 1 - D_k(z_s))] + E[max(0, 1 + D_k(sg(ẑ_s)))]                        (hinge)

G and D alternate 1:1 within a step (G first on the current D, then D on the
same ẑ_s without its gradient, so the student runs once). Both use AdamW
(lr 1e-5, betas 0.9/0.999, weight decay 0.01) after global-norm clipping.
The latent LPIPS term (`metrics.latent_lpips`: the pair augmented alike, then
E-LatentLPIPS) needs the release's weights, which are not bundled: given
with --latent-lpips they are loaded; without them the term is off and the run
says so.

A run folder holds run.json (what the run is: models, configs, data, options;
a resume with anything else is refused), data/ (prepared once), orbax
checkpoints (the last `keep`), log.csv, losses.png and adapter.safetensors
(adapter + LoRA, what `--hspace adapter:FILE` loads). Batches and noise of
step i come from fold_in(seed, i), so N steps, a kill, and N more steps give
the same parameters as 2N steps in one go.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from kadiff_jax import image_io, schedulers, sharding
from kadiff_jax.config import csv_tuple, option
from kadiff_jax.job import Job
from kadiff_jax.models import hspace_adapter, unet
from kadiff_jax.metrics import latent_lpips as latent_lpips_lib
from kadiff_jax.models.attention import HookInputs
from kadiff_jax.pipelines import conditioning
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.ragturbo import adapter_file, discriminator, lora
from kadiff_jax.ragturbo.database import HSpaceDatabase, compute_features, model_identity
from kadiff_jax.ragturbo.injection import AdapterInjection, Retrieved
from kadiff_jax.ragturbo.pipeline import database_digest
from kadiff_jax.ragturbo.text_key import ModelTextKey
from kadiff_jax.weights.models import DiffusionModels

log = logging.getLogger("kadiff_jax")
LOSSES = ("loss_g", "adv_g", "distill", "lpips", "loss_d", "d_real", "d_fake")


class TrainError(ValueError):
  """A run folder, checkpoint or training input that cannot be used."""


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  steps: int = option(1000, "training iterations in all (a resumed run continues to this count; the paper: 20K)")
  batch_size: int = option(4, "global batch, split over the devices (the paper: 2048)")
  lr: float = option(1e-5, "AdamW learning rate of the student's adapter + LoRA and of the discriminator (constant)")
  weight_decay: float = option(0.01, "AdamW weight decay (not given by the paper)")
  b1: float = option(0.9, "AdamW beta1")
  b2: float = option(0.999, "AdamW beta2")
  grad_clip: float = option(1.0, "global-norm gradient clipping of each update")
  distill_weight: float = option(2.5, "weight of the smooth-L1 distillation loss (Eq. 10)")
  lpips_weight: float = option(1.0, "weight of the latent LPIPS loss (Eq. 10; off without --latent-lpips)")
  lora_rank: int = option(64, "LoRA rank on the student's decoder (Q7)")
  lora_targets: tuple[str, ...] = option(lora.DEFAULT_TARGETS, "param-path globs of the LoRA kernels (Q7)",
                                         parse=csv_tuple)
  disc_stages: tuple[str, ...] = option(discriminator.DEFAULT_STAGES, "teacher encoder stages with a "
                                        "discriminator head (Q8)", parse=csv_tuple)
  k: int = option(1, "retrieved neighbours per training sample (Q3)")
  student_input: str = option("noised", "the student's input at t1: noised data (Eq. 1) or pure noise (Q9)",
                              choices=("noised", "noise"))
  t1: int = option(999, "the student's (discrete) timestep")
  seed: int = option(0, "seed of initialisation, batches and noise")
  checkpoint_every: int = option(100, "steps between checkpoints")
  keep: int = option(3, "checkpoints kept (the newest)")
  teacher_steps: int = option(50, "teacher sampling steps for the synthetic pairs")
  teacher_guidance: float = option(7.5, "teacher classifier-free guidance for the synthetic pairs")
  size: int | None = option(None, "training image side (default: the student's)")

  def __post_init__(self):
    for name in ("steps", "batch_size", "lora_rank", "k", "checkpoint_every", "keep", "teacher_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
    if self.lr <= 0:
      raise ValueError(f"lr={self.lr}: expected a positive learning rate")
    if not 0 <= self.t1 < 1000:
      raise ValueError(f"t1={self.t1}: expected a timestep in [0, 999]")
    if self.student_input not in ("noised", "noise"):
      raise ValueError(f"student_input={self.student_input!r}: expected noised or noise")

  def identity(self) -> dict:
    """The options that make a run what it is (a resume may change only steps, checkpointing and keep)."""
    d = dataclasses.asdict(self)
    for name in ("steps", "checkpoint_every", "keep"):
      d.pop(name)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class TrainData:
  """Every training sample's inputs (host arrays, one row per sample)."""

  z0: np.ndarray       # [N, h, w, 4] clean latents
  embeds: np.ndarray   # [N, 77, D] τ(p)
  text: np.ndarray     # [N, D] unit text keys (the discriminator's pooled text)
  h_ref: np.ndarray    # [N, k, hh, ww, C] retrieved h0_r
  lam: np.ndarray      # [N, k]
  prompts: list[str]
  retrieved: list[list[str]]
  kinds: list[str]     # "synthetic" | "real"

  FIELDS = ("z0", "embeds", "text", "h_ref", "lam")

  def __len__(self) -> int:
    return len(self.prompts)

  def save(self, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in self.FIELDS:
      np.save(tmp / f"{f}.npy", getattr(self, f), allow_pickle=False)
    (tmp / "samples.json").write_text(json.dumps({"prompts": self.prompts, "retrieved": self.retrieved,
                                                  "kinds": self.kinds}))
    os.replace(tmp, folder)

  @classmethod
  def load(cls, folder: Path) -> "TrainData":
    try:
      arrays = {f: np.load(folder / f"{f}.npy", allow_pickle=False) for f in cls.FIELDS}
      meta = json.loads((folder / "samples.json").read_text())
      return cls(**arrays, **meta)
    except (OSError, ValueError, TypeError) as e:
      raise TrainError(f"{folder}: prepared training data unreadable ({e}); delete the folder to prepare it "
                       "again") from None


def read_prompts(path: str | os.PathLike) -> list[str]:
  try:
    lines = Path(path).read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise TrainError(f"--prompts {path}: unreadable ({e})") from None
  prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
  if not prompts:
    raise TrainError(f"--prompts {path}: no prompts (one per line expected)")
  return prompts


def prepare_data(student: DiffusionModels, teacher: DiffusionModels, database: HSpaceDatabase, prompts: Sequence[str],
                 real_entries: Sequence, options: TrainOptions, progress: bool = True) -> TrainData:
  """Synthetic pairs (the teacher's latents for each prompt, CFG) and real pairs (VAE latents of corpus images
  with their captions), each with its τ(p), text key and retrieved h0_r and λ."""
  size = options.size or student.default_size
  z, texts, kinds = [], [], []
  if prompts:
    jobs = [Job.numbered(p, options.seed, i) for i, p in enumerate(prompts)]
    gen = t2i.GenerationOptions(steps=options.teacher_steps, guidance=options.teacher_guidance, height=size,
                                width=size)
    latents, _ = t2i.generate(teacher, jobs, gen, progress=progress)
    z.append(latents)
    texts += list(prompts)
    kinds += ["synthetic"] * len(prompts)
  if real_entries:
    from retrieval.corpus import caption_text
    z.append(compute_features(student, real_entries, "latent", size, progress=progress))
    texts += [caption_text(e) for e in real_entries]
    kinds += ["real"] * len(real_entries)
  embeds = np.asarray(conditioning.encode_prompts(student, texts).embeds)
  keys = ModelTextKey(student, database.text_key).encode(texts)
  hits = database.search(keys, options.k)
  ids = [[d for d, _ in row] for row in hits]
  h = database.hspace(student, [d for row in ids for d in row])
  return TrainData(np.concatenate(z).astype(np.float32), embeds, keys,
                   h.reshape((len(texts), options.k) + h.shape[1:]),
                   np.asarray([[s for _, s in row] for row in hits], np.float32), list(texts), ids, kinds)


# ------------------------------------------------------------------------------------------------ state
@dataclasses.dataclass(frozen=True)
class Setup:
  """The static facts of a run, shared by the train step and the run folder."""

  student_config: unet.UNetConfig
  teacher_config: unet.UNetConfig
  adapter_config: hspace_adapter.HSpaceAdapterConfig
  options: TrainOptions
  prediction_type: str
  latent_lpips: bool = False  # the E-LatentLPIPS term is on (its weights were given)
  dtype: Any = jnp.float32


def optimizer(options: TrainOptions) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(options.grad_clip),
                     optax.adamw(options.lr, b1=options.b1, b2=options.b2, weight_decay=options.weight_decay))


def init_state(student: DiffusionModels, teacher: DiffusionModels, setup: Setup) -> dict:
  key = jax.random.PRNGKey(setup.options.seed)
  g = {"adapter": hspace_adapter.init_params(setup.adapter_config, jax.random.fold_in(key, 1)),
       "lora": lora.init(student.unet_params, jax.random.fold_in(key, 2), setup.options.lora_rank,
                         setup.options.lora_targets)}
  d, sn = discriminator.init(teacher.unet_config, student.text_config.hidden_size, jax.random.fold_in(key, 3),
                             setup.options.disc_stages)
  tx = optimizer(setup.options)
  return {"step": jnp.zeros((), jnp.int32), "g": g, "d": d, "sn": sn, "g_opt": tx.init(g), "d_opt": tx.init(d)}


def _hinge_d(real: dict, fake: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  r = sum(jnp.mean(jax.nn.relu(1.0 - v)) for v in real.values())
  f = sum(jnp.mean(jax.nn.relu(1.0 + v)) for v in fake.values())
  return r + f, r, f


def _smooth_l1(a, b):
  d = jnp.abs(a - b)
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def train_step(state: dict, batch: dict, key: jax.Array, student_params, teacher_params, schedule: jax.Array,
               lpips_params=None, *, setup: Setup) -> tuple[dict, dict]:
  """One G update then one D update (see the module docstring); returns (state', losses)."""
  opts = setup.options
  k1, k2, k3, k4 = jax.random.split(key, 4)
  z0, b = batch["z0"], batch["z0"].shape[0]
  eps1 = jax.random.normal(k1, z0.shape)
  a1, s1 = jnp.sqrt(schedule[opts.t1]), jnp.sqrt(1.0 - schedule[opts.t1])
  z_t1 = a1 * z0 + s1 * eps1 if opts.student_input == "noised" else eps1
  s = jax.random.randint(k2, (b,), 0, schedule.shape[0])
  eps2 = jax.random.normal(k3, z0.shape)
  a_s = jnp.sqrt(schedule[s]).reshape(b, 1, 1, 1)
  s_s = jnp.sqrt(1.0 - schedule[s]).reshape(b, 1, 1, 1)
  cond = unet.UNetCond(batch["embeds"])
  z_s = a_s * z0 + s_s * eps2
  hook = AdapterInjection(setup.adapter_config)
  retrieved = Retrieved(batch["h_ref"], batch["lam"], jnp.ones((b,), jnp.float32))
  tx = optimizer(opts)

  def student_x0(g):
    params = lora.merge(student_params, g["lora"])
    out, _ = unet.apply(params, z_t1, jnp.full((b,), float(opts.t1)), cond, config=setup.student_config,
                        hooks=(hook,), hook_args={hook.name: HookInputs(g["adapter"], retrieved)}, dtype=setup.dtype)
    out = out.astype(jnp.float32)
    if setup.prediction_type == "epsilon":
      return (z_t1 - s1 * out) / a1
    if setup.prediction_type == "v_prediction":
      return a1 * z_t1 - s1 * out
    return out

  def disc(d, sn, x, update):
    return discriminator.apply(d, sn, teacher_params, x, s.astype(jnp.float32), cond, batch["text"],
                               config=setup.teacher_config, update=update, dtype=setup.dtype)

  def g_loss(g):
    x0 = student_x0(g)
    fake, _ = disc(state["d"], state["sn"], a_s * x0 + s_s * eps2, False)
    adv = -sum(jnp.mean(v) for v in fake.values())
    distill = _smooth_l1(x0, z0)
    lp = jnp.zeros(())  # E-LatentLPIPS: off without its weights (module docstring)
    if setup.latent_lpips:
      lp = jnp.mean(latent_lpips_lib.distance(lpips_params, *latent_lpips_lib.augment(k4, x0, z0)))
    return adv + opts.distill_weight * distill + opts.lpips_weight * lp, (x0, adv, distill, lp)

  (lg, (x0, adv, distill, lp)), grads = jax.value_and_grad(g_loss, has_aux=True)(state["g"])
  updates, g_opt = tx.update(grads, state["g_opt"], state["g"])
  g = optax.apply_updates(state["g"], updates)
  fake_s = jax.lax.stop_gradient(a_s * x0 + s_s * eps2)

  def d_loss(d):
    real, sn = disc(d, state["sn"], z_s, True)
    fake, _ = disc(d, sn, fake_s, False)
    total, r, f = _hinge_d(real, fake)
    return total, (sn, r, f)

  (ld, (sn, dr, df)), dgrads = jax.value_and_grad(d_loss, has_aux=True)(state["d"])
  updates, d_opt = tx.update(dgrads, state["d_opt"], state["d"])
  d = optax.apply_updates(state["d"], updates)
  new = {"step": state["step"] + 1, "g": g, "d": d, "sn": sn, "g_opt": g_opt, "d_opt": d_opt}
  return new, {"loss_g": lg, "adv_g": adv, "distill": distill, "lpips": lp, "loss_d": ld, "d_real": dr,
               "d_fake": df}


@functools.lru_cache(maxsize=2)
def jitted_step(setup: Setup):
  """The train step jitted for `setup`, donating the old state."""
  return jax.jit(functools.partial(train_step, setup=setup), donate_argnums=(0,))


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
  """The samples of step `step`: a fresh permutation draw per step (i.i.d. batches), from (seed, step) only."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed ^ 0x5EED), step)
  return np.asarray(jax.random.choice(key, n, (batch_size,), replace=n < batch_size))


def step_key(seed: int, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), step)


# ------------------------------------------------------------------------------------------------ run folder
def run_identity(student: DiffusionModels, teacher: DiffusionModels, setup: Setup, data_digest: str) -> dict:
  return {"format": "kadiff-hspace-adapter-run", "student": model_identity(student),
          "teacher": model_identity(teacher), "adapter": setup.adapter_config.to_json(),
          "options": setup.options.identity(), "data": data_digest}


def check_run(out: Path, identity: dict) -> None:
  """Refuses a run folder made for another model, adapter config, data or options, naming what differs."""
  path = out / "run.json"
  if not path.is_file():
    if any(out.glob("checkpoints/*")):
      raise TrainError(f"{out} holds checkpoints but no run.json: not a run of this command; use another --out")
    return
  try:
    old = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise TrainError(f"{path} is unreadable ({e}); use another --out") from None
  diffs = []
  for section in ("student", "teacher", "adapter", "options", "data"):
    a, b = old.get(section), identity[section]
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        diffs += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k) and k != "source"]
      else:
        diffs.append(f"{section}: {a!r} -> {b!r}")
  if diffs:
    raise TrainError(f"{out} holds a run of another model or config ({'; '.join(diffs[:4])}); resume it with the "
                     "same inputs or use another --out")


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_log(path: Path, rows: list[dict]) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=["step", *LOSSES, "steps_per_s"])
  w.writeheader()
  for r in rows:
    w.writerow(r)
  _atomic_write(path, buf.getvalue().encode())


def read_log(path: Path, upto: int) -> list[dict]:
  if not path.is_file():
    return []
  with open(path, newline="") as f:
    return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def loss_curves(rows: list[dict], title: str) -> np.ndarray:
  """The loss curves of a run as an RGB image."""
  from kadiff_jax.plots import _pyplot, _render
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  steps = [int(r["step"]) for r in rows]
  for ax, names, label in ((axes[0], ("loss_g", "adv_g"), "generator"), (axes[1], ("distill", "lpips"), "G terms"),
                           (axes[2], ("loss_d", "d_real", "d_fake"), "discriminator (hinge)")):
    for n in names:
      ax.plot(steps, [float(r[n]) for r in rows], label=n, linewidth=1)
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  return _render(fig)


def _checkpointer(folder: Path, keep: int):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(folder.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                                      enable_async_checkpointing=False))


def restore(manager, step: int, like: dict) -> dict:
  import orbax.checkpoint as ocp
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for a damaged or foreign checkpoint
    raise TrainError(f"checkpoint {manager.directory}/{step} cannot be restored ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]}); delete it to resume from the one before") from None


def train(student: DiffusionModels, teacher: DiffusionModels, database: HSpaceDatabase, out: str | os.PathLike,
          options: TrainOptions, *, prompts: Sequence[str] = (), real_entries: Sequence = (),
          latent_lpips: str | None = None, progress: bool = True, mesh=None, stop_after: int | None = None,
          on_start=None) -> dict:
  """Trains (or resumes) the run in `out`; returns {"step", "adapter", "losses": last row}. `stop_after` ends this
  call after that many new steps (as if killed), leaving the last checkpoint behind. `on_start()` runs once the
  folder is known to be this run's (a refused folder is left as it was)."""
  import orbax.checkpoint as ocp
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  lpips_params, lpips_sha = None, None
  if latent_lpips:
    lpips_params = latent_lpips_lib.load(latent_lpips, student.unet_config.in_channels)
    with open(latent_lpips, "rb") as f:
      lpips_sha = hashlib.sha256(f.read()).hexdigest()[:16]
  else:
    log.warning("latent LPIPS term off: no E-LatentLPIPS weights given (--latent-lpips; they are not bundled), so "
                "Eq. 10 trains with the adversarial and smooth-L1 terms only")
  database.check_model(student)
  if teacher.unet_config.cross_attention_dim[0] != student.text_config.hidden_size:
    raise TrainError(f"the teacher UNet reads {teacher.unet_config.cross_attention_dim[0]}-wide text states, the "
                     f"student's text encoder gives {student.text_config.hidden_size}")
  if not prompts and not real_entries:
    raise TrainError("no training data: give --prompts (teacher generations) and/or --images (real pairs)")
  mesh = mesh or sharding.data_mesh()
  if options.batch_size % mesh.size:
    raise TrainError(f"batch_size={options.batch_size}: expected a multiple of the {mesh.size} devices")
  sched = schedulers.from_name("ddim", student.scheduler_config).config
  setup = Setup(student.unet_config, teacher.unet_config, hspace_adapter.HSpaceAdapterConfig.for_unet(
      student.unet_config), options, sched.prediction_type, lpips_params is not None)
  digest = hashlib.sha256(json.dumps({"prompts": list(prompts), "real": [e.id for e in real_entries],
                                      "database": database_digest(database),
                                      "teacher": model_identity(teacher)["fingerprint"],
                                      "opts": [options.teacher_steps, options.teacher_guidance, options.size,
                                               options.k, options.seed]}).encode()).hexdigest()[:16]
  identity = run_identity(student, teacher, setup, digest)
  identity["options"]["latent_lpips"] = lpips_sha
  check_run(out, identity)
  _atomic_write(out / "run.json", json.dumps(identity, indent=1).encode())
  if on_start is not None:
    on_start()
  data_dir = out / f"data-{digest}"
  if data_dir.is_dir():
    data = TrainData.load(data_dir)
  else:
    data = prepare_data(student, teacher, database, prompts, real_entries, options, progress)
    data.save(data_dir)
  log.info("training data: %d samples (%d synthetic, %d real), k=%d", len(data), data.kinds.count("synthetic"),
           data.kinds.count("real"), options.k)

  state = init_state(student, teacher, setup)
  manager = _checkpointer(out / "checkpoints", options.keep)
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    state = restore(manager, start, state)
    log.info("resuming %s from step %d", out, start)
  rows = read_log(out / "log.csv", start)
  rep = sharding.replicated(mesh)
  state = jax.device_put(state, rep)
  student_params, teacher_params = (jax.device_put(p, rep) for p in (student.unet_params, teacher.unet_params))
  schedule = jax.device_put(jnp.asarray(sched.alphas_cumprod(), jnp.float32), rep)
  lpips_params = None if lpips_params is None else jax.device_put(lpips_params, rep)
  step_fn = jitted_step(setup)
  arrays = {f: getattr(data, f) for f in TrainData.FIELDS}
  end = options.steps if stop_after is None else min(options.steps, start + stop_after)
  bar = tqdm(total=options.steps, initial=start, disable=not progress, desc="train hspace-adapter", unit="step")
  t0, done = time.perf_counter(), 0
  for step in range(start, end):
    idx = batch_indices(options.seed, step, len(data), options.batch_size)
    batch = sharding.shard_batch({f: a[idx] for f, a in arrays.items()}, mesh)
    state, losses = step_fn(state, batch, step_key(options.seed, step), student_params, teacher_params, schedule,
                            lpips_params)
    done += 1
    row = {"step": step + 1, **{k: f"{float(v):.6g}" for k, v in losses.items()},
           "steps_per_s": f"{done / (time.perf_counter() - t0):.4g}"}
    rows.append(row)
    bar.set_postfix({k: row[k] for k in ("loss_g", "distill", "loss_d")})
    bar.update(1)
    if (step + 1) % options.checkpoint_every == 0 or step + 1 == end:
      manager.save(step + 1, args=ocp.args.StandardSave(jax.device_get(state)))
      manager.wait_until_finished()
      write_log(out / "log.csv", rows)
      _atomic_write(out / "losses.png", image_io.png_bytes(loss_curves(rows, f"H-space adapter, {out.name}")))
      adapter_file.save(out / "adapter.safetensors", jax.device_get(state["g"]["adapter"]), setup.adapter_config,
                        model_identity(student), lora=jax.device_get(state["g"]["lora"]))
  bar.close()
  return {"step": end, "adapter": str(out / "adapter.safetensors"), "losses": rows[-1] if rows else {}}
