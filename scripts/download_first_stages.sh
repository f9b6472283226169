#!/bin/bash
# upstream's pretrained first stages, each into models/first_stage_models/<name>/ (model.ckpt, config.yaml)
source "$(dirname "$0")/download_lib.sh"
fetch models/first_stage_models/kl-f4 https://ommer-lab.com/files/latent-diffusion/kl-f4.zip
fetch models/first_stage_models/kl-f8 https://ommer-lab.com/files/latent-diffusion/kl-f8.zip
fetch models/first_stage_models/kl-f16 https://ommer-lab.com/files/latent-diffusion/kl-f16.zip
fetch models/first_stage_models/kl-f32 https://ommer-lab.com/files/latent-diffusion/kl-f32.zip
fetch models/first_stage_models/vq-f4 https://ommer-lab.com/files/latent-diffusion/vq-f4.zip
fetch models/first_stage_models/vq-f4-noattn https://ommer-lab.com/files/latent-diffusion/vq-f4-noattn.zip
fetch models/first_stage_models/vq-f8 https://ommer-lab.com/files/latent-diffusion/vq-f8.zip
fetch models/first_stage_models/vq-f8-n256 https://ommer-lab.com/files/latent-diffusion/vq-f8-n256.zip
fetch models/first_stage_models/vq-f16 https://ommer-lab.com/files/latent-diffusion/vq-f16.zip
report
