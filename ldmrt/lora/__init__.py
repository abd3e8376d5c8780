"""LoRA adapters: read (diffusers / PEFT and kohya layouts), fused at export, switched at run time.

    ldmrt.lora.reading.read_lora(path)          -> LoraFile
    ldmrt.lora.targets.lora_deltas(model, ...)  -> {state key: float32 change}
    ldmrt.lora.switch.WeightSwitch(model).set   in place, base restored bit for bit
    ldmrt.lora.slot.AdapterSlot                 a Pipeline's adapters (torch-free)
    ldmrt.lora.choice.LoraChoice                FILE[:SCALE] (torch-free)

The package itself imports nothing, so the torch-free runtime can use the torch-free modules.
"""
