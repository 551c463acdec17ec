from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)
    stock = models.IntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)


class Note(models.Model):
    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="notes")
    text = models.CharField(max_length=200)
