//! Adam written on tch tensors so that its state can be checkpointed.
//!
//! tch's `nn::Optimizer` hides its moment estimates, and a resumed trial must continue the same
//! trajectory, so this follows `torch.optim.Adam` (single-tensor path, `amsgrad=False`, L2 weight
//! decay added to the gradient) step for step and exposes its state by name.

use tch::Tensor;

/// One set of parameters sharing a learning rate and weight decay (a PyTorch "param group").
#[derive(Debug)]
pub struct ParamGroup {
    /// Named parameters (the names key the optimizer state in checkpoints).
    pub params: Vec<(String, Tensor)>,
    /// Learning rate.
    pub lr: f64,
    /// L2 penalty added to the gradient (`grad += weight_decay * param`).
    pub weight_decay: f64,
}

#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: f64,
    weight_decay: f64,
}

/// Adam with PyTorch's update rule and inspectable state.
#[derive(Debug)]
pub struct Adam {
    slots: Vec<Slot>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: i64,
    prefix: String,
}

/// Default key prefix of optimizer state in a checkpoint.
const STATE_PREFIX: &str = "optim.";

impl Adam {
    /// Adam over `groups` with the given betas and `eps` (PyTorch's default eps is 1e-8).
    pub fn new(groups: Vec<ParamGroup>, betas: (f64, f64), eps: f64) -> Self {
        let slots = groups
            .into_iter()
            .flat_map(|group| {
                let (lr, weight_decay) = (group.lr, group.weight_decay);
                group.params.into_iter().map(move |(name, param)| Slot {
                    exp_avg: param.zeros_like(),
                    exp_avg_sq: param.zeros_like(),
                    name,
                    param,
                    lr,
                    weight_decay,
                })
            })
            .collect();
        Self { slots, beta1: betas.0, beta2: betas.1, eps, step: 0, prefix: STATE_PREFIX.to_string() }
    }

    /// Keys this optimizer's state under `prefix` instead of `optim.` (for several optimizers in
    /// one checkpoint, e.g. a GAN's two).
    pub fn with_state_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// Number of steps taken so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// Applies one update from the gradients currently held by the parameters.
    ///
    /// In place where PyTorch's single-tensor Adam is, so a step allocates two parameter-sized
    /// temporaries (three with weight decay) instead of one per operation: on large layers each
    /// temporary is fresh memory, faulted in page by page (docs/performance.md).
    pub fn step(&mut self) {
        self.step += 1;
        let bias_correction1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        tch::no_grad(|| {
            for slot in &mut self.slots {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                // grad + weight_decay·param, without touching the parameter's own gradient.
                let grad = if slot.weight_decay != 0.0 {
                    let mut decayed = &slot.param * slot.weight_decay;
                    let _ = decayed.g_add_(&grad);
                    decayed
                } else {
                    grad
                };
                let _ = slot.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = slot.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = slot.exp_avg_sq.addcmul_(&grad, &(&grad * (1.0 - beta2)));
                let mut denom = slot.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bias_correction2_sqrt);
                let _ = denom.g_add_scalar_(eps);
                // param −= step_size · exp_avg / denom, as one addcdiv_ (tch's has no `value`, so
                // the step size goes into the denominator).
                let step_size = slot.lr / bias_correction1;
                let _ = denom.g_div_scalar_(-step_size);
                let _ = slot.param.addcdiv_(&slot.exp_avg, &denom);
            }
        });
    }

    /// The optimizer state as named tensors, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let prefix = &self.prefix;
        let mut state = vec![(format!("{prefix}step"), Tensor::from(self.step))];
        for slot in &self.slots {
            state.push((format!("{prefix}{}.exp_avg", slot.name), slot.exp_avg.shallow_clone()));
            state.push((format!("{prefix}{}.exp_avg_sq", slot.name), slot.exp_avg_sq.shallow_clone()));
        }
        state
    }

    /// Restores the state written by [`Adam::state`]; `lookup` finds a tensor by name.
    pub fn load_state(&mut self, lookup: impl Fn(&str) -> Option<Tensor>) -> Result<(), String> {
        let missing = |name: &str| format!("checkpoint lacks optimizer state {name}");
        let step_key = format!("{}step", self.prefix);
        self.step = lookup(&step_key).ok_or_else(|| missing(&step_key))?.int64_value(&[]);
        tch::no_grad(|| {
            for slot in &mut self.slots {
                for (suffix, target) in [("exp_avg", &mut slot.exp_avg), ("exp_avg_sq", &mut slot.exp_avg_sq)] {
                    let key = format!("{}{}.{suffix}", self.prefix, slot.name);
                    let value = lookup(&key).ok_or_else(|| missing(&key))?;
                    if value.size() != target.size() {
                        return Err(format!("optimizer state {key} has shape {:?}, expected {:?}", value.size(), target.size()));
                    }
                    target.copy_(&value);
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Two steps of a hand-computed Adam on a scalar, with weight decay.
    #[test]
    fn matches_the_closed_form_on_a_scalar() {
        let p = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
        let mut adam =
            Adam::new(vec![ParamGroup { params: vec![("p".into(), p.shallow_clone())], lr: 0.1, weight_decay: 0.5 }], (0.9, 0.999), 1e-8);
        let (mut m, mut v, mut x) = (0.0f64, 0.0f64, 1.0f64);
        for t in 1..=2 {
            adam.zero_grad();
            (&p * &p).sum(Kind::Double).backward();
            adam.step();
            let g = 2.0 * x + 0.5 * x;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let denom = v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
            x -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            assert!((p.double_value(&[0]) - x).abs() < 1e-12, "step {t}: {} vs {x}", p.double_value(&[0]));
        }
        assert_eq!(adam.steps(), 2);
    }

    #[test]
    fn state_round_trips() {
        let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let group = || vec![ParamGroup { params: vec![("w".into(), p.shallow_clone())], lr: 1e-3, weight_decay: 0.0 }];
        let mut adam = Adam::new(group(), (0.9, 0.999), 1e-8);
        (&p * 3.0).sum(Kind::Float).backward();
        adam.step();
        let state = adam.state();
        let mut restored = Adam::new(group(), (0.9, 0.999), 1e-8);
        restored.load_state(|name| state.iter().find(|(n, _)| n == name).map(|(_, t)| t.copy())).unwrap();
        assert_eq!(restored.steps(), 1);
        let again = restored.state();
        for ((n1, t1), (n2, t2)) in state.iter().zip(again.iter()) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{n1}");
        }
        let err = restored.load_state(|_| None).unwrap_err();
        assert!(err.contains("optim.step"), "{err}");
    }
}
