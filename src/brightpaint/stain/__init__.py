"""Virtual staining: predict fluorescence channels from brightfield, trained on plates with both.

Inputs. The in-focus brightfield plane of a site (from the focus table) and, with `half_width` > 0,
the planes around it as extra channels (out-of-focus planes carry the phase contrast that shows where
nuclei are). Every plane is illumination-corrected, then the stack is z-scored with the mean and
standard deviation of its centre plane (per field of view: brightfield brightness varies with lamp and
well, and carries no biology), so plane k keeps its contrast relative to focus.

Targets. Each fluorescence channel, illumination-corrected (and Noise2Void-denoised where the plate
has a denoised store), scaled per plate as (x - median) / (q99.5 - median) of the plate's training
sites (`target_norm: plate`, default) or per field of view as (x - median) / IQR (`target_norm: fov`).
The per-plate scale is the default because rescaling every field on its own erases intensity
differences between wells, which are the screen's biology (a treatment that doubles DNA content must
still double the virtual DNA), and because the IQR of a sparse fluorescence field is the camera noise,
not the stain. Predictions are written back in the training plates' reference scale (the medians of
their per-plate medians and spreads), recorded in the model card, so every plate's virtual channels
share one scale.

Training (`train.train_stain_model`). Random crops of `patch` px, augmented (flips, 90-degree rotations,
small scale changes on input and target; intensity / contrast jitter, blur and noise on the input
only); a masked loss so that a plate lacking a target channel still trains the others; wells split
into training and validation (never sites of one well on both sides); early stopping on the
validation loss, best weights kept; seeded. Architectures and losses are in `models`:
U-Net + L1 (default), UNeXt2, MS-SSIM + L1, and a conditional WGAN-GP with a PatchGAN critic.

Prediction (`predict.predict_virtual`) runs in overlapping tiles blended with raised-cosine ramps
(`inference.predict_tiled`), in batches, with bf16 autocast and channels-last memory on a GPU.

Models (`files`) are a safetensors file (weights plus the card as metadata; no pickled code) and a
card.json beside it: architecture, channels, normalisation, training plates and wells, metrics,
versions and the weights' sha256.

Modules: `settings` (StainSettings, StainError), `data` (inputs and targets, well split, training
set, crops and batches), `models` (networks and losses), `train` (training loop, model card, training
domain), `files` (model file and card), `predict` (prediction, virtual.zarr layout, a shard of a
plate), `evaluate` (pixel metrics, examples figure). Plate access (stores, planes, intensity scales)
is `brightpaint.plate`.
"""
