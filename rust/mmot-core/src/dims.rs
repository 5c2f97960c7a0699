//! The dimensions of a batch of row-major problems, shared by the kernels' APIs.

/// `problems` independent `rows` × `cols` matrices, stored contiguously one after another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub problems: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Dims {
    pub fn new(problems: usize, rows: usize, cols: usize) -> Self {
        Self {
            problems,
            rows,
            cols,
        }
    }

    /// Elements of one problem's matrix.
    pub fn matrix_len(&self) -> usize {
        self.rows * self.cols
    }

    /// Elements of the whole batch.
    pub fn len(&self) -> usize {
        self.problems * self.matrix_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[problems, rows, cols]`, as error messages print a shape.
    pub fn describe(&self) -> String {
        format!("[{}, {}, {}]", self.problems, self.rows, self.cols)
    }
}
