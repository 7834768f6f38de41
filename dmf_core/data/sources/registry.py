"""Known datasets and weights: where to get them, what the archive is called, what must be inside.

``params.yaml`` names a registry key per dataset (``datasets.<name>.registry``); the download
stage uses the entry for the expected archive names, a known sha256, the official per-split
statistics (checked after parsing) and the access/licence note shown when the user has to
fetch the archive by hand. Counts are those of FACTS.md §6.1 (torchreid docstrings, the
dataset pages); ``ids`` counts distinct pids *including* Market's distractor pid 0, which is why
Market's gallery has 751 (750 test ids + the distractors). ``None`` means "not published, not
checked".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

#: Where the FineGPR identity-attribute file goes (captions.file of the paper profile).
#: Not under data/raw/<name>/: that folder is the download stage's output and DVC deletes it.
ATTRIBUTES_PATH = "data/archives/FineGPR_attributes.csv"

Stats = dict[str, dict[str, "int | None"]]


def _stats(**splits: tuple[int | None, int | None]) -> Stats:
    return {split: {"ids": ids, "images": images} for split, (ids, images) in splits.items()}


@dataclass(frozen=True)
class DatasetEntry:
    key: str
    title: str
    kind: Literal["dataset", "weights"] = "dataset"
    layout: str | None = None  # parser in dmf_core.data.sources.layouts (None for weights)
    layout_options: dict = field(default_factory=dict)  # extra parse_layout() keywords
    urls: tuple[str, ...] = ()  # direct http(s) links that a plain GET can fetch
    archive_names: tuple[str, ...] = ()  # expected file name(s) under data/archives/
    sha256: dict[str, str] = field(default_factory=dict)  # archive name -> sha256, where known
    sha256_prefix: str | None = None  # e.g. timm/torch.hub "<name>-<first 8 hex>.pth"
    statistics: Stats = field(default_factory=dict)  # {split: {"ids", "images"}}
    access: Literal["public", "cloud-drive", "request", "withdrawn"] = "public"
    licence: str = ""
    note: str = ""  # how to obtain it; printed when it must be fetched by hand
    homepage: str = ""
    images: str | None = None  # photo collection; entries with the same value hold the same photos

    @property
    def withdrawn(self) -> bool:
        return self.access == "withdrawn"

    def default_archive(self) -> str | None:
        return self.archive_names[0] if self.archive_names else None

    def known_sha256(self, archive_name: str) -> str | None:
        return self.sha256.get(archive_name)

    def how_to_get(self) -> str:
        """One paragraph for error messages: where it comes from and where to put it."""
        where = " or ".join(f"data/archives/{n}" for n in self.archive_names) or "data/archives/"
        parts = [f"{self.title} ({self.access})."]
        if self.note:
            parts.append(self.note)
        if self.licence:
            parts.append(f"Licence: {self.licence}.")
        parts.append(f"Put the archive at {where} and set datasets.<name>.source: archive, "
                     "location: <that path> (or source: dir with an extracted folder).")
        return " ".join(parts)


_FINEGPR_NOTE = (
    "FineGPR is on cloud drives only (no direct link): full set SJTU jbox https://jbox.sjtu.edu.cn/l/E1Eh68 "
    "(password fmqw) or Baidu https://pan.baidu.com/s/18cQXtGqJKLjU7HpX5o9gWQ (jpr9); subset SJTU "
    "https://jbox.sjtu.edu.cn/l/E1HTsw (qbdg), Baidu https://pan.baidu.com/s/1amLde8W1vpqacaqz8v4jWw "
    "(h4k5), OneDrive https://1drv.ms/u/s!AvX6fEo1OAv5sz448xpinu8k6rdU?e=kqmQ97. The identity "
    f"attribute annotation must be converted to {ATTRIBUTES_PATH} (pid + the 13 FineGPR codes, "
    "docs/captions.md), the path captions.file names."
)
_MSMT_NOTE = (
    "MSMT17 is distributed only on request: e-mail the authors (Longhui Wei / Shiliang Zhang, Peking "
    "University; the old page http://www.pkuvmc.com/publications/msmt17.html is offline) and sign the "
    "release agreement. Redistribution is not allowed."
)

_ENTRIES = [
    DatasetEntry(
        key="finegpr", title="FineGPR (full, 1,150 IDs, 2,028,600 images)", layout="finegpr",
        layout_options={"variant": "full"}, archive_names=("FineGPR.zip", "FineGPR.tar.gz"),
        statistics=_stats(train=(1150, 2028600)), access="cloud-drive",
        licence="research / non-commercial use only, no redistribution (repository badge GPL-3.0)",
        note=_FINEGPR_NOTE, homepage="https://github.com/JeremyXSC/FineGPR",
    ),
    DatasetEntry(
        key="finegpr_subset", title="FineGPR official subset (4 images per ID)", layout="finegpr",
        layout_options={"variant": "subset"}, archive_names=("FineGPR_subset.zip", "FineGPR_subset.tar.gz"),
        statistics=_stats(train=(1150, None)),  # image count not published
        access="cloud-drive",
        licence="research / non-commercial use only, no redistribution (repository badge GPL-3.0)",
        note=_FINEGPR_NOTE, homepage="https://github.com/JeremyXSC/FineGPR",
    ),
    DatasetEntry(
        key="market1501", title="Market-1501 (v15.09.15)", layout="market",
        urls=("http://188.138.127.15:81/Datasets/Market-1501-v15.09.15.zip",),  # torchreid mirror, often down
        archive_names=("Market-1501-v15.09.15.zip",),
        statistics=_stats(train=(751, 12936), query=(750, 3368), gallery=(751, 15913)),
        access="public", licence="research use only (see the dataset page)",
        note=("The torchreid mirror is usually unreachable; other copies: Google Drive "
              "https://drive.google.com/file/d/0B8-rUzbwVRk0c054eEozWG9COHM/view , Baidu "
              "https://pan.baidu.com/s/1ntIi2Op (download by hand)."),
        homepage="http://www.liangzheng.org/Project/project_reid.html",
    ),
    DatasetEntry(
        key="dukemtmcreid", title="DukeMTMC-reID", layout="market",
        archive_names=("DukeMTMC-reID.zip",),
        statistics=_stats(train=(702, 16522), query=(702, 2228), gallery=(1110, 17661)),
        access="withdrawn", licence="was CC BY-NC-SA 4.0; withdrawn by its owners",
        note=("Withdrawn by Duke University (2019); the official link "
              "http://vision.cs.duke.edu/DukeMTMC/data/misc/DukeMTMC-reID.zip no longer serves it and it "
              "should not be used for new work. Only a copy you already hold can be used (local archive)."),
    ),
    DatasetEntry(
        key="msmt17_v1", title="MSMT17 (V1)", layout="msmt17", layout_options={"variant": "MSMT17_V1"},
        archive_names=("MSMT17_V1.tar.gz", "MSMT17_V1.zip"),
        statistics=_stats(train=(1041, 32621), query=(3060, 11659), gallery=(3060, 82161)),
        access="request", licence="research use under the authors' release agreement", note=_MSMT_NOTE,
        images="msmt17",
    ),
    DatasetEntry(
        key="msmt17_v2", title="MSMT17 (V2, faces blurred)", layout="msmt17",
        layout_options={"variant": "MSMT17_V2"}, archive_names=("MSMT17_V2.tar.gz", "MSMT17_V2.zip"),
        statistics=_stats(train=(1041, 32621), query=(3060, 11659), gallery=(3060, 82161)),
        access="request", licence="research use under the authors' release agreement", note=_MSMT_NOTE,
        images="msmt17",  # V2 = V1 with faces blurred: the same photos
    ),
    DatasetEntry(
        key="msmt17_all", title="MSMT17_all (train+val+query+gallery as one training set)",
        layout="msmt17", layout_options={"combine_all": True},
        archive_names=("MSMT17_V1.tar.gz", "MSMT17_V1.zip", "MSMT17_V2.tar.gz", "MSMT17_V2.zip"),
        statistics=_stats(train=(4101, 126441)), access="request",
        licence="research use under the authors' release agreement",
        note=_MSMT_NOTE + " MSMT17_all uses the same archive as MSMT17 (QAConv's combine_all).",
        images="msmt17",
    ),
    DatasetEntry(
        key="cuhk03np_detected", title="CUHK03-NP (detected)", layout="cuhk03np",
        layout_options={"variant": "detected"}, archive_names=("cuhk03-np.zip",),
        statistics=_stats(train=(767, 7365), query=(700, 1400), gallery=(700, 5332)),
        access="cloud-drive", licence="research use only (CUHK03 terms)",
        note=("CUHK03-NP (new protocol, Zhong et al. CVPR'17): the cuhk03-np folder linked from "
              "https://github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP (Google Drive / "
              "Baidu); the original CUHK03 is at http://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html."),
        homepage="https://github.com/zhunzhong07/person-re-ranking",
    ),
    DatasetEntry(
        key="cuhk03np_labeled", title="CUHK03-NP (labeled)", layout="cuhk03np",
        layout_options={"variant": "labeled"}, archive_names=("cuhk03-np.zip",),
        statistics=_stats(train=(767, 7368), query=(700, 1400), gallery=(700, 5328)),
        access="cloud-drive", licence="research use only (CUHK03 terms)",
        note="Same archive as cuhk03np_detected (it holds both detected/ and labeled/).",
        homepage="https://github.com/zhunzhong07/person-re-ranking",
    ),
    DatasetEntry(
        key="randperson_subset", title="RandPerson subset (8,000 IDs, 132,145 images)", layout="randperson",
        archive_names=("randperson_subset.zip", "randperson_subset.tar.gz"),
        statistics=_stats(train=(8000, 132145)), access="cloud-drive", licence="research use",
        note=("Google Drive https://drive.google.com/file/d/1qIFvTPt1q37_xWeGbFumZag6uAx9c4--/view "
              "(subset); the full set is on Baidu https://pan.baidu.com/s/1nfjRzNmxMKddYmVALoXfNw (code v6mt)."),
        homepage="https://github.com/VideoObjectSearch/RandPerson",
    ),
    DatasetEntry(
        key="cuhksysu", title="CUHK-SYSU crops (11,934 IDs, 34,574 images; training source only)",
        layout="cuhksysu", archive_names=("cuhksysu.zip", "cuhksysu.tar.gz"),
        statistics=_stats(train=(11934, 34574)), access="request",
        licence="research use only (the dataset owners' terms)",
        note=("No public URL: obtain CUHK-SYSU from its owners and zip the cropped person images as torchreid "
              "and fast-reid read them, cuhksysu/cropped_images/p<pid>_s<scene>_<n>.jpg (or use source: dir). "
              "Every crop is a training image (camid 0, no query/gallery): a finetune source, never an "
              "evaluation target."),
    ),
    DatasetEntry(
        key="vit_base_jx", title="ViT-B/16 ImageNet weights (timm jx_vit_base_p16_224)", kind="weights",
        urls=("https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
              "jx_vit_base_p16_224-80ecf9dd.pth",),
        archive_names=("jx_vit_base_p16_224-80ecf9dd.pth",), sha256_prefix="80ecf9dd",
        access="public", licence="Apache-2.0 (timm)",
        note="Direct GitHub release download; the file name carries the first 8 hex digits of its sha256.",
        homepage="https://github.com/huggingface/pytorch-image-models",
    ),
]

REGISTRY: dict[str, DatasetEntry] = {e.key: e for e in _ENTRIES}


def _entry_of(name: str, spec) -> DatasetEntry | None:
    """The registry entry a configured dataset uses (its ``registry`` key, else its own name)."""
    return REGISTRY.get(getattr(spec, "registry", None) or name)


def _train_holds_test(name: str, spec, entry: DatasetEntry | None) -> bool:
    """Whether the dataset's train split also holds its query and gallery (combine_all)."""
    if entry is not None and entry.layout == spec.layout and "combine_all" in entry.layout_options:
        return bool(entry.layout_options["combine_all"])
    return spec.layout == "msmt17" and name.lower().endswith("_all")  # parse_msmt17's default


def shared_photos(source: str, target: str, datasets_cfg: Mapping[str, object]) -> str | None:
    """What ``source`` and ``target`` share, or None: the same dataset, the same registry photo
    collection (MSMT17 V1 / V2 / _all) or the same archive or folder. Names missing from
    ``datasets_cfg`` (e.g. ``pretrain``) share nothing."""
    src, tgt = datasets_cfg.get(source), datasets_cfg.get(target)
    if src is None or tgt is None:
        return None
    src_entry, tgt_entry = _entry_of(source, src), _entry_of(target, tgt)
    if source == target:
        return "the same dataset"
    if src_entry is not None and tgt_entry is not None and src_entry.images is not None \
            and src_entry.images == tgt_entry.images:
        return f"the same photo collection ({src_entry.images})"
    if src.location and src.location == tgt.location:
        return f"the same files ({src.location})"
    return None


def leakage_reason(source: str, target: str, datasets_cfg: Mapping[str, object], *,
                   test_splits_trained: bool = False) -> str | None:
    """Why fine-tuning on ``source`` and testing on ``target`` is no transfer result, or None.

    ``datasets_cfg`` is ``Config.datasets`` (name -> DatasetSpec). A source whose training set
    holds its own query and gallery (MSMT17_all, QAConv's combine_all, or every source when
    ``test_splits_trained``: Protocol-3's ``finetune.splits``) leaks into every target showing the
    same photos (:func:`shared_photos`). A source showing the same photos as a target under
    another name (MSMT17 V2 against V1) trains in the target's domain: in-domain, not transfer.
    """
    why = shared_photos(source, target, datasets_cfg)
    if why is None:
        return None
    src = datasets_cfg[source]
    if test_splits_trained or _train_holds_test(source, src, _entry_of(source, src)):
        how = "finetune.splits" if test_splits_trained else "combine_all"
        return (f"{source} trains on train+query+gallery ({how}) and {target} tests on {why}: "
                f"{source}'s training images include {target}'s query and gallery, so this cell is not "
                "a transfer result")
    if source == target:
        return None  # the in-domain cell: out of the cross-domain mean already, and no leak
    return (f"{source} and {target} are {why}: training on {source} is training in {target}'s domain, "
            "so this cell is in-domain, not a transfer result")
