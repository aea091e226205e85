//! The shapes of the `Backend` ops that take more than two sizes: small `Copy` structs, so that a call names
//! what each size is (`Gemm::nt(rows, out, inp)`, not `m, n, k, false, true` among the operands) and an
//! implementation hands one value on to its helpers.

/// Shapes of one causal attention call. q is (B, Tq, H, D), k and v are (B, Tk, Hkv, D), all row-major;
/// query row i sits at absolute position `q_pos0 + i` and sees keys 0..=q_pos0+i (Tk >= q_pos0 + Tq).
/// Training uses Tq = Tk = T, q_pos0 = 0; KV-cached decoding uses Tq = new tokens, Tk = cache length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub q_pos0: usize,
}

impl AttnShape {
    /// Training shape: full causal self-attention over T positions.
    pub fn causal(batch: usize, t: usize, n_head: usize, n_kv_head: usize, head_dim: usize) -> Self {
        AttnShape {
            batch,
            tq: t,
            tk: t,
            n_head,
            n_kv_head,
            head_dim,
            q_pos0: 0,
        }
    }
    pub fn q_len(&self) -> usize {
        self.batch * self.tq * self.n_head * self.head_dim
    }
    pub fn kv_len(&self) -> usize {
        self.batch * self.tk * self.n_kv_head * self.head_dim
    }
    /// Length of the log-sum-exp buffer: one per (batch, head, query row).
    pub fn lse_len(&self) -> usize {
        self.batch * self.n_head * self.tq
    }
}

/// The shape of one `Backend::matmul`: C (m x n) = op(A) op(B) [+ C when `accumulate`], row-major. op(A) is
/// m x k: A is stored m x k, or k x m when `a_t`; op(B) is k x n: B is stored k x n, or n x k when `b_t`.
/// The constructors name the transposes as BLAS does (N: as stored, T: transposed; A's letter first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
    /// C += op(A) op(B) rather than C = op(A) op(B).
    pub accumulate: bool,
}

impl Gemm {
    /// C = A B: neither operand transposed, C written.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            a_t: false,
            b_t: false,
            accumulate: false,
        }
    }
    /// C = A B^T: B stored n x k (a linear layer's y = x W^T with W stored (out, in)).
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Gemm::nn(m, n, k).transposed(false, true)
    }
    /// C = A^T B: A stored k x m (a weight's gradient dW = dy^T x).
    pub fn tn(m: usize, n: usize, k: usize) -> Self {
        Gemm::nn(m, n, k).transposed(true, false)
    }
    /// This product with the transposes given (for callers that choose them at run time).
    pub fn transposed(self, a_t: bool, b_t: bool) -> Self {
        Gemm { a_t, b_t, ..self }
    }
    /// This product added into C when `yes`, written over C otherwise.
    pub fn accumulating(self, yes: bool) -> Self {
        Gemm {
            accumulate: yes,
            ..self
        }
    }
    /// Elements of A (m k), of B (k n) and of C (m n).
    pub fn a_len(&self) -> usize {
        self.m * self.k
    }
    pub fn b_len(&self) -> usize {
        self.k * self.n
    }
    pub fn c_len(&self) -> usize {
        self.m * self.n
    }
    /// Floating-point operations: a multiply and an add per (i, j, p).
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }
}

/// The shape of a rotary (or rotary + QK-norm) call on x (B, T, heads, D), row-major: row t of each
/// sequence is at absolute position `pos0 + t` (0 in training; the cache length when decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub batch: usize,
    pub t: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub pos0: usize,
}

impl Heads {
    /// `batch` sequences of `t` positions from 0, `heads` heads of `head_dim` each.
    pub fn new(batch: usize, t: usize, heads: usize, head_dim: usize) -> Self {
        Heads {
            batch,
            t,
            heads,
            head_dim,
            pos0: 0,
        }
    }
    /// This shape with its first position at `pos0`.
    pub fn from_position(self, pos0: usize) -> Self {
        Heads { pos0, ..self }
    }
    /// Rows of `head_dim` values (one per position and head): what the per-head norm runs over.
    pub fn rows(&self) -> usize {
        self.batch * self.t * self.heads
    }
    /// Elements of x.
    pub fn numel(&self) -> usize {
        self.rows() * self.head_dim
    }
}
