# %% [markdown]
# # new_sampler

# %%
print(1)
