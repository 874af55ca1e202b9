# %% [markdown]
# # two_d_math

# %%
print(1)
