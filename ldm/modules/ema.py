import torch
from torch import nn


def warm_up_decay(decay, updates):
    """The decay of the `updates`-th average: at most (1 + n) / (10 + n), so that a short run is not
    dominated by its first weights (0.994 at update 1500, 0.9955 at 2000)."""
    return min(decay, (1 + updates) / (10 + updates))


def with_ema_of_parts_not_held(model, sd):
    """`sd`, a state dict for `model` (which keeps an EMA: model_ema, ema_tracked()), with the EMA copy
    of every part it averages none of (LitEma.parts; e.g. a text encoder in a checkpoint saved before
    it was averaged too) set to that part's weights in `sd`: what sampling used for it then."""
    if not getattr(model, "use_ema", False):
        return sd
    held, _ = model.model_ema.held_parts(sd, "model_ema.")
    tracked = model.ema_tracked()
    key_of = {id(p): key for key, p in model.named_parameters()}
    out = dict(sd)
    for name, s_name in model.model_ema.m_name2s_name.items():
        key = key_of[id(tracked.get_parameter(name))]
        if name.split(".")[0] not in held and key in sd:
            out[f"model_ema.{s_name}"] = sd[key]
    return out


class LitEma(nn.Module):
    def __init__(self, model, decay=0.9999, use_num_upates=True):
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ValueError('Decay must be between 0 and 1')

        self.m_name2s_name = {}
        self.register_buffer('decay', torch.tensor(decay, dtype=torch.float32))
        self.register_buffer('num_updates', torch.tensor(0,dtype=torch.int) if use_num_upates
                             else torch.tensor(-1,dtype=torch.int))

        for name, p in model.named_parameters():
            if p.requires_grad:
                #remove as '.'-character is not allowed in buffers
                s_name = name.replace('.','')
                self.m_name2s_name.update({name:s_name})
                self.register_buffer(s_name,p.clone().detach().data)

        self.collected_params = []

    def forward(self,model):
        decay = self.decay

        if self.num_updates >= 0:
            self.num_updates += 1
            decay = warm_up_decay(self.decay, self.num_updates)

        one_minus_decay = 1.0 - decay

        with torch.no_grad():
            m_param = dict(model.named_parameters())
            shadow_params = dict(self.named_buffers())

            for key in m_param:
                if m_param[key].requires_grad:
                    sname = self.m_name2s_name[key]
                    shadow_params[sname] = shadow_params[sname].type_as(m_param[key])
                    shadow_params[sname].sub_(one_minus_decay * (shadow_params[sname] - m_param[key]))
                else:
                    assert not key in self.m_name2s_name

    def parts(self):
        """{part: buffer names}: the averaged weights by the top-level module of the tracked model they
        belong to (the UNet's 'diffusion_model', a text encoder trained with it 'cond_stage_model').
        A checkpoint holds the average of a part wholly or not at all, as one saved before the
        part was averaged does."""
        parts = {}
        for name, s_name in self.m_name2s_name.items():
            parts.setdefault(name.split(".")[0], []).append(s_name)
        return parts

    def held_parts(self, keys, prefix):
        """(held, partial): the parts whose every buffer, or only some, is among `keys` as prefix + name."""
        keys, held, partial = set(keys), [], []
        for part, s_names in self.parts().items():
            n = sum(prefix + s_name in keys for s_name in s_names)
            if n == len(s_names):
                held.append(part)
            elif n:
                partial.append(part)
        return held, partial

    def restart_from(self, model, parts=None):
        """Start the average over at `model`'s weights (of `parts` only, when given): the copy made at
        construction holds the random initialisation, which a checkpoint without an EMA copy of its
        own does not replace."""
        shadow_params = dict(self.named_buffers())
        with torch.no_grad():
            for name, s_name in self.m_name2s_name.items():
                if parts is None or name.split(".")[0] in parts:
                    shadow_params[s_name].copy_(model.get_parameter(name))

    def copy_to(self, model):
        m_param = dict(model.named_parameters())
        shadow_params = dict(self.named_buffers())
        for key in m_param:
            if m_param[key].requires_grad:
                m_param[key].data.copy_(shadow_params[self.m_name2s_name[key]].data)
            else:
                assert not key in self.m_name2s_name

    def store(self, parameters):
        """
        Save the current parameters for restoring later.
        Args:
          parameters: Iterable of `torch.nn.Parameter`; the parameters to be
            temporarily stored.
        """
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters):
        """
        Restore the parameters stored with the `store` method.
        Useful to validate the model with EMA parameters without affecting the
        original optimization process. Store the parameters before the
        `copy_to` method. After validation (or model saving), use this to
        restore the former parameters.
        Args:
          parameters: Iterable of `torch.nn.Parameter`; the parameters to be
            updated with the stored parameters.
        """
        for c_param, param in zip(self.collected_params, parameters):
            param.data.copy_(c_param.data)
