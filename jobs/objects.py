"""Object discovery by graph centrality: the ``objects`` stage of ``jobs.discover`` (spec search §9a).

``python -m jobs.discover --index ROOT --set stages=[objects]``

1. Pass 1 (Ray tasks over blocks of database images): the CNN's global-layer activations at each of
   the index's global scales, their feature saliency F̂, FS.egm regions, each region's descriptor
   (ν(GeM), the index's global whitening when it has one) and feature saliency f. Parts are committed
   per block, so a killed run resumes.
2. The region graph: mutual kNN over all regions (the same distributed kNN tasks as ``jobs.graph``:
   exact blocks, faiss IVF at scale), regions of one image never linked (repetition across images is
   what centrality should measure), s = [vᵀu]₊^β; Katz centrality g* by one CG solve of L_α g = 1.
3. Pass 2 (Ray tasks): per image and scale the object-saliency map S (eq. 16) from each a × a patch's
   nearest regions of other images, OS.egm regions on S, Σ ν(GeM) per scale; scales combined by GeM
   as the index combines them, whitened like the index: the saliency-based global descriptor, stored
   in the rows of ``ROOT/global`` (``jobs.search --method os`` ranks it; queries keep their plain GeM,
   as the seed's queries keep theirs, T:23912-23913).

Artifacts: :mod:`storage.objects`. Per-image regions: :mod:`operators.objects`. Parameters:
:class:`operators.saliency.SaliencyParams`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import ray

from cluster.runner import run_tasks
from jobs.config import from_dict
from jobs.graph import GraphConfig, gather_knn, ivf_index, vector_knn
from jobs.summary import JobSummary
from operators.centrality import katz
from operators.constraints import Count
from operators.graph import affinity
from operators.knn import drop_groups
from operators.objects import combine_scales, fs_regions, os_boxes, region_search, whiten
from operators.saliency import SaliencyParams, l2n, region_gem
from storage.artifacts import ArtifactRoot
from storage.collection import read_image
from storage.extraction import global_describer, recorded_describer
from storage.global_index import open_global
from storage.objects import (
    REGIONS,
    load_katz,
    merge_descriptors,
    merge_regions,
    object_parts,
    open_regions,
    write_katz,
    write_objects_meta,
    write_part,
)

FS_PARAMS = ("fs_rho", "sigma", "tau", "egm_iters", "max_regions", "gem_p")  # the parameters pass 1 reads


@dataclass
class ObjectsConfig:
    params: SaliencyParams = field(default_factory=SaliencyParams)
    images_per_task: Count = 32  # database images per Ray task (a committed part)
    knn: GraphConfig = field(default_factory=GraphConfig)  # the region kNN tasks (block, IVF threshold, nprobe)
    checkpoint: str | None = None  # the describer's weights, when the index names a file outside its root


# ------------------------------------------------------------------------------------------
# Per image (inside the tasks)
# ------------------------------------------------------------------------------------------
def _images(root: ArtifactRoot, files: list[str]) -> tuple[list[int], list[np.ndarray], list[str]]:
    """Decoded images (their positions in ``files``) and one error line per file that failed."""
    ok, images, errors = [], [], []
    for i, f in enumerate(files):
        try:
            images.append(read_image(f, root.options))
            ok.append(i)
        except Exception as e:  # noqa: BLE001 - recorded, the image keeps its plain GeM
            errors.append(f"{f}: {type(e).__name__}: {e}")
    return ok, images, errors


def regions_task(
    uri: str, options: dict, part: int, image_ids: np.ndarray, files: list[str], params: dict, record: dict
) -> dict:
    """Pass 1 for a block of images: every FS.egm region (image, scale, box, f, descriptor), committed."""
    root, p = ArtifactRoot(uri, options), from_dict(SaliencyParams, params)
    describer, white = global_describer(root)
    cols: dict[str, list] = {k: [] for k in ("image_id", "scale", "boxes", "fs", "vectors")}
    ok, images, errors = _images(root, files)
    for i, maps in zip(ok, describer.global_maps(images) if images else []):
        for scale, a in zip(describer.cfg.global_scales, maps):
            boxes, fs, z = fs_regions(a, p)
            for k, v in (
                ("image_id", np.full(len(boxes), image_ids[i])),
                ("scale", np.full(len(boxes), scale)),
                ("boxes", boxes),
                ("fs", fs),
                ("vectors", whiten(z, white)),
            ):
                cols[k].append(v)
    arrays = {k: np.concatenate(v) if v else np.zeros((0, 4) if k == "boxes" else 0) for k, v in cols.items()}
    return write_part(root, "region_parts", part, arrays, {**record, "errors": errors, "found": len(arrays["fs"])})


def os_task(
    uri: str,
    options: dict,
    part: int,
    image_ids: np.ndarray,
    files: list[str],
    params: dict,
    record: dict,
    index_bytes: bytes | None = None,
    nprobe: int = 32,
) -> dict:
    """Pass 2 for a block of images: OS maps, OS.egm regions and the saliency-based descriptors, committed."""
    root, p = ArtifactRoot(uri, options), from_dict(SaliencyParams, params)
    describer, white = global_describer(root)
    table, regions = open_regions(root)
    f, g = table["fs"].to_numpy(np.float32), load_katz(root)
    region_image = np.asarray(regions.ids)
    extra = len(describer.cfg.global_scales) * p.max_regions  # an image's own regions, dropped after the search
    search = region_search(regions.vectors, index_bytes, nprobe)
    ok, images, errors = _images(root, files)
    out_ids, out_vec, counts = [], [], []
    for i, maps in zip(ok, describer.global_maps(images) if images else []):
        per_scale = []
        for a in maps:
            boxes = os_boxes(a, image_ids[i], search, region_image, f, g, white, p, extra)
            per_scale.append(l2n(region_gem(a, boxes, p.gem_p).sum(0)))
            counts.append(len(boxes))
        v = combine_scales(per_scale, describer.cfg.gem_p)
        out_ids.append(image_ids[i]), out_vec.append(whiten(v[None], white)[0])
    arrays = {
        "image_id": np.asarray(out_ids, np.int64),
        "vectors": np.stack(out_vec) if out_vec else np.zeros((0, regions.vectors.shape[1]), np.float32),
    }
    return write_part(root, "os_parts", part, arrays, {**record, "errors": errors, "found": int(sum(counts))})


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------
def _run_parts(
    root: ArtifactRoot, kind: str, task, cfg: ObjectsConfig, record: dict, desc: str, summary: JobSummary, *args
) -> list[int]:
    """Run ``task`` over blocks of the database images, skipping parts committed with the same record."""
    ids = np.asarray(open_global(root).ids)
    files = root.image_files().loc[ids].tolist()
    done = object_parts(root, kind).committed()
    params, todo = dataclasses.asdict(cfg.params), []
    blocks = range(0, len(ids), cfg.images_per_task)
    for part, s in enumerate(blocks):
        rec = {**record, "images": ids[s : s + cfg.images_per_task].tolist()}
        if all(done.get(part, {}).get(k) == v for k, v in rec.items()):
            summary.add(**{f"{kind}_skipped": 1})
            continue
        todo.append(
            (
                root.uri,
                root.options,
                part,
                ids[s : s + cfg.images_per_task],
                files[s : s + cfg.images_per_task],
                params,
                rec,
                *args,
            )
        )
    run_tasks(
        task,
        todo,
        options={"num_cpus": 1},
        desc=desc,
        unit="block",
        on_result=lambda r: summary.add(image_errors=len(r.get("errors", []))),
        keep=False,
    )
    return list(range(len(blocks)))


def region_centrality(root: ArtifactRoot, cfg: ObjectsConfig, summary: JobSummary) -> np.ndarray:
    """Katz centrality of every region on the mutual kNN graph of regions of different images."""
    p = cfg.params
    _, regions = open_regions(root)
    n, image = len(regions.ids), np.asarray(regions.ids)
    k_search = min(n - 1, p.k + int(np.unique(image, return_counts=True)[1].max()))
    tasks, summary.info["region_knn"] = vector_knn(cfg.knn, root, k_search, REGIONS)
    nn, sims = np.full((n, k_search), -1, np.int64), np.full((n, k_search), -np.inf, np.float32)
    gather_knn(tasks, nn, sims, "region kNN")
    sims, nn = drop_groups(sims, nn, image, image, p.k)
    w = affinity(nn, sims, n=n, k=p.k, gamma=p.beta, mode="mutual")
    g = katz(w, p.alpha)
    write_katz(root, g)
    summary.add(region_graph_edges=int(w.nnz // 2), isolated_regions=int((np.diff(w.indptr) == 0).sum()))
    return g


def build_objects(cfg: ObjectsConfig, root: ArtifactRoot, summary: JobSummary) -> dict:
    """The three steps of the module doc; returns the stage's meta (also ``objects/meta.json``)."""
    params = dataclasses.asdict(cfg.params)
    extract = recorded_describer(root, cfg.checkpoint)
    settings = {"fs": {k: params[k] for k in FS_PARAMS}, "extract": extract}  # what pass 1 depends on
    with summary.stage("objects pass 1: FS.egm regions"):
        parts = _run_parts(root, "region_parts", regions_task, cfg, settings, "FS regions", summary)
        n_regions = merge_regions(root, parts)
    with summary.stage("objects: region graph and Katz centrality"):
        region_centrality(root, cfg, summary)
    record = {**settings, "params": params, "knn": dataclasses.asdict(cfg.knn), "regions": n_regions}  # g follows from
    # these, though not bit for bit (CG)
    with summary.stage("objects pass 2: OS maps and descriptors"):
        index_ref = ray.put(ivf_index(cfg.knn, root, REGIONS) if n_regions > cfg.knn.ivf_threshold else None)
        parts = _run_parts(root, "os_parts", os_task, cfg, record, "OS descriptors", summary, index_ref, cfg.knn.nprobe)
        described = merge_descriptors(root, parts)
    meta = {
        "params": params,
        "extract": extract,
        "regions": n_regions,
        "images": described,
        "regions_per_image_scale": n_regions / max(1, described * len(extract["global_scales"])),
    }
    write_objects_meta(root, meta)
    summary.add(object_regions=n_regions, object_images=described)
    return meta
