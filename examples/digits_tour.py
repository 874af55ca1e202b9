# %% [markdown]
# # digits_tour

# %%
print(1)
