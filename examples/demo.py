"""xent_jax in an optax training loop: an MLP on scikit-learn's digits.

Trains for a few seconds on a CPU and prints the loss falling and the test
accuracy. Run with ``python examples/demo.py``.
"""

import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import xent_jax


def init(key, sizes=(64, 128, 10)):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
        params.append((w, jnp.zeros(fan_out)))
    return params


def model(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def loss_fn(params, x, y):
    logits = model(params, x)
    return xent_jax.softmax_cross_entropy_with_integer_labels(
        logits, y, label_smoothing=0.1, reduction="mean"
    )


def main() -> float:
    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target, jnp.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0
    )
    params = init(jax.random.PRNGKey(0))
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for epoch in range(1, 301):
        params, opt_state, loss = step(params, opt_state, x_train, y_train)
        if epoch == 1 or epoch % 50 == 0:
            print(f"step {epoch:4d}  train loss {float(loss):.4f}")
    predictions = model(params, x_test).argmax(-1)
    accuracy = float((predictions == y_test).mean())
    print(f"test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
