"""The compiled pipeline: in sync, components' interfaces, GPU settings, parameter form."""
import dataclasses
import os

import yaml

from dpfedemb.config import PipelineParams
from pipeline import compile as compile_lib
from pipeline import dag
from pipeline.__main__ import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(tmp_path, accelerator=dag.DEFAULT_ACCELERATOR):
    path = str(tmp_path / "p.yaml")
    compile_lib.compile_to(path, accelerator)
    return yaml.safe_load(open(path))


def test_checked_in_pipeline_yaml_is_in_sync(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli(["compile", "--check"]) == 0


def test_stale_file_is_detected(tmp_path):
    stale = tmp_path / "pipeline.yaml"
    stale.write_text("old: true\n")
    assert compile_lib.main(str(stale), check=True) == 1


def test_every_parameter_is_typed_defaulted_and_described(tmp_path):
    spec = _spec(tmp_path)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    for f in dataclasses.fields(PipelineParams):
        p = inputs[f.name]
        assert p["description"], f.name
        assert p["defaultValue"] == getattr(PipelineParams(), f.name), f.name
        assert p["parameterType"] == {"int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE",
                                      "str": "STRING"}[f.type]
    assert "defaultValue" not in inputs["data_dir"] and inputs["data_dir"]["description"]


def test_components_inputs_and_outputs(tmp_path):
    comps = _spec(tmp_path)["components"]

    def io(name):
        c = comps[f"comp-{name}"]
        ins = set(c.get("inputDefinitions", {}).get("artifacts", {})) | \
            set(c.get("inputDefinitions", {}).get("parameters", {}))
        outs = set(c.get("outputDefinitions", {}).get("artifacts", {})) | \
            set(c.get("outputDefinitions", {}).get("parameters", {}))
        return ins, outs
    assert io("partition-users") == ({"data_dir", "params_json", "pseudonym_key_file"},
                                     {"partitions", "stats"})
    assert io("pretrain-public") == ({"data_dir", "params_json"}, {"model", "metrics"})
    assert io("train-dp-federated") == ({"params_json", "pipeline_job", "partitions", "init_model"},
                                        {"model", "privacy_ledger", "metrics"})
    assert io("finetune") == ({"params_json", "pipeline_job", "partitions", "init_model",
                               "prior_ledger"},
                              {"model", "privacy_ledger", "metrics"})
    assert io("evaluate")[1] == {"metrics", "evaluation", "report_md", "report_html"}
    types = comps["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert types["report_html"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert types["report_md"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert comps["comp-train-dp-federated"]["outputDefinitions"]["artifacts"]["model"][
        "artifactType"]["schemaTitle"] == "system.Model"


def test_gpu_only_on_the_two_training_tasks_and_accelerator_is_a_compile_option(tmp_path):
    spec = _spec(tmp_path, accelerator="nvidia.com/gpu")
    execs = spec["deploymentSpec"]["executors"]
    with_gpu = {k for k, v in execs.items() if "accelerator" in v["container"].get("resources", {})}
    assert with_gpu == {"exec-train-dp-federated", "exec-finetune"}
    for k in with_gpu:
        acc = execs[k]["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
        assert execs[k]["container"]["image"] == "dpfedemb-gpu:latest"
    assert execs["exec-partition-users"]["container"]["image"] == "dpfedemb-cpu:latest"
    assert all("resourceCpuLimit" in v["container"]["resources"]
               for k, v in execs.items() if k != "exec-validate-parameters")


def test_validate_component_takes_exactly_the_pipeline_parameters():
    """The parameter list is written out twice (KFP extracts component source, so it cannot be
    generated): this keeps both copies equal to PipelineParams."""
    import inspect
    from components.validate_parameters import validate_parameters
    names = [n for n in inspect.signature(validate_parameters).parameters if n != "parameters"]
    assert names == [f.name for f in dataclasses.fields(PipelineParams)]
