"""Seeded synthetic high-throughput screen (the "demo screen") in the input contract, with truth.

Physical model of one site (every number is recorded in the truth files):

* Cells: seeds are dart-thrown at a density set by cell type and treatment. Nuclei are ellipses
  with a wavy rim; cell bodies grow from them by a distance-limited Voronoi competition in each
  cell's own shape-normalised distance, so cell k always contains nucleus k (same label id).
* Fluorescence (clean, arbitrary units ~0..1): DNA = nuclear thickness profile x band-pass
  chromatin texture, darker nucleoli; CYTO = cell-body dome; DAMAGE = dim nuclear background +
  Poisson(rate) diffraction-limited foci per nucleus (rate set by the MoA); each seen through the
  widefield PSF (Gaussian, FLUORESCENCE_PSF px), so zero outside objects but for that blur.
* Brightfield: cells are thin, nearly transparent phase objects. Following the transport-of-
  intensity approximation, the intensity at defocus dz (in planes) is
      I(dz) = G_s * [1 - A - kappa * dz * Laplacian(phi)],   s^2 = s0^2 + (beta * dz)^2
  with A a weak, sharp absorption map (membranes, granules, nuclear envelope, nucleoli, chromatin)
  and phi a smooth optical-thickness map (cell dome, denser nucleus, nucleoli). Contrast inverts
  through focus; fine detail exists only near focus, so variance-of-Laplacian peaks there while
  the (larger, blurred) phase contrast peaks off focus, as on real data.
* Acquisition, per plate and channel: ADU = Poisson(gain * (clean + background) * flat * batch)
  + N(0, read^2) + dark, rounded and clipped to uint16. `background` is a uniform
  autofluorescence / unbound-dye level (fluorescence only, not in the clean truth), lit by the same
  field as the cells; `flat` is a smooth off-centre vignetting field (mean 1, corner/centre
  0.6-0.8); `batch` is a per-batch, per-channel multiplicative factor; `dark` is the camera's
  offset (DARK_OFFSET, the same for every plate and channel: one camera). The fluorescence is dim
  (tens of photons per clean unit, a short HTS exposure), so its shot noise is what Noise2Void is
  for.

Every random draw comes from a numpy SeedSequence keyed by (seed, plate, well, site) (or by plate,
batch, channel for plate-level fields), so output is byte-identical for any number of workers.

Modules: `spec` (ScreenSpec, PlateSpec, channels), `treatments` (compounds, MoAs, phenotypes, used
wells and plate map), `seeds` (keyed random generators), `cells` (cell types, scenes and their
masks), `fluorescence` (clean stains, widefield PSF), `brightfield` (absorption, phase, defocus
z-stack), `camera` (flat field, batch, gain, noise, dark offset), `site` (one site:
`simulate_site`), `screen` (`simulate_screen` writes the screen and its truth; `describe_screen`),
and `cellpose_weights` (trains the shipped Cellpose networks on generated sites). No science
module imports this package.
"""
